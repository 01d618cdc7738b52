"""PPO for RLHF: one frozen PaLM serves as actor, critic, frozen reference and (optionally) reward model.

One iteration (`RLHFTrainer.step`), in the order of Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences") and InstructGPT (Ouyang et al. 2022), each step numbered in the code:

    1. rollout: a batch of prompts, responses sampled at temperature T with the KV-cached sampler,
       truncated after their first EOS; log-probs of the policy softmax(logits / T)
    2. per-token reward r_t = -beta * KL_t(policy || reference), plus the reward model's score on the
       last response token (or, from a process reward model with `token_rewards`, such as
       ImplicitPRM, its reward on every response token); beta fixed or adaptive (Ziegler et al. eq. 2)
    3. values V_t from the critic (its own LoRA scope on the same base, plus a zero-initialised head)
    4. GAE advantages and returns (Schulman et al. 2016), advantages whitened over the batch
    5. epochs x minibatches of the clipped policy loss, clipped value loss and entropy bonus
       (Schulman et al. 2017), gradient clipping, one AdamW step per minibatch
    6. diagnostics: score, KL to the reference, approx KL old -> new, clip fraction, explained
       variance, response length, entropy

Where this departs from InstructGPT / Ziegler et al.:

    1. Actor and critic are LoRA scopes on one frozen base, and the reference policy is that base
       with adapters disabled (Hydra-RLHF, Santacroce et al. 2023), not three separate models.
       The reference is therefore the model passed in, as it was before any adapter.
    2. The critic starts from the base with a zero value head, not from the reward model.
    3. No pretraining-gradient mix (InstructGPT's PPO-ptx); the KL penalty alone keeps the policy
       near the reference.
    4. Rollouts sample at temperature T only (no top-k / top-p), so the samples come from exactly the
       policy whose log-probs enter the ratio; top-k / top-p are offered for best-of-N only.
    5. The KL in the reward is a one-sample estimate per token, k1 = log pi - log pi_ref by default
       (as Ziegler et al.), or k2 / k3 (Schulman 2020, "Approximating KL Divergence").
    6. Reward-model scores are used as they come, not normalised to mean 0 / std 1 on reference
       samples (Ziegler et al. section 2.2).
    7. Optionally, a response that never emits EOS has `missing_eos_penalty` subtracted from its
       score (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
    8. One optimizer (two parameter groups) steps on policy loss + vf_coef * value loss; actor and
       critic gradients are clipped separately.
    9. Dropout is off in rollouts and updates alike (the PaLM keeps its rates for LM training), so
       the first ratio is exactly 1 and the reference log-probs carry no dropout noise.
   10. On several processes, each samples its own rollout and whitens its advantages over it (not
       over all processes' rollouts); the gradients are averaged over processes.
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from beartype import beartype
from torch import nn
from tqdm.auto import tqdm

from palm_rlhf.compat import PPO_TRAIN, RLHF_TRAINER, ppo_episodes, rlhf_trainer_inputs, upstream_keywords
from palm_rlhf.palm import PaLM, left_pad
from palm_rlhf.tokenizer import ByteTokenizer, check_vocab_size
from palm_rlhf.training import whole_copy

# ---------------------------------------------------------------------------------------------------
# the maths: masks are bool, True at response tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the True entries of mask (all dims, or `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the True entries of mask; 0 elsewhere."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """sum of x over the True entries of mask / num_tokens (default: their count). A minibatch that
    comes in micro-batches, or is split over processes, passes the whole minibatch's token count, so
    that the summed parts are its token mean (masked_mean of each part would weigh a part's tokens
    by 1 / its own count)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = sum_l (gamma * lam)^l * delta_{t+l}

    rewards, values, mask: (b, r), the mask a prefix of True per row (the response); V = 0 after
    the last response token, where the episode ends. Returns advantages and returns = A + V, (b, r).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_log_ratio(log_probs: torch.Tensor, other_log_probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log_probs - other_log_probs, 0 where mask is False: exponentiated at padding, an extreme
    difference there would give inf, and inf * 0 = NaN after the mask."""
    log_ratio = log_probs - other_log_probs
    return log_ratio if mask is None else log_ratio.masked_fill(~mask, 0.0)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL Divergence"), with log r = log pi_ref - log pi:
    k1 = -log r (unbiased), k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, never negative).
    With `mask`, 0 where it is False."""
    log_ratio = masked_log_ratio(ref_log_probs, log_probs, mask)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def clipped_surrogate(log_probs, old_log_probs, advantages, clip: float = 0.2, clip_high: float | None = None,
                      mask: torch.Tensor | None = None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) per token, as a loss to minimise:

        l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t),  rho_t = pi / pi_old

    eps_low = `clip`; eps_high = `clip_high`, or `clip` when None. A larger eps_high lets unlikely
    tokens with a positive advantage gain more probability per update (DAPO's "Clip-Higher",
    Yu et al. 2025, section 3.1). With `mask`, the ratio is 1 where it is False. Returns l_t and
    whether the clipped term was chosen, both (b, r)."""
    ratio = masked_log_ratio(log_probs, old_log_probs, mask).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_policy_loss(log_probs, old_log_probs, advantages, mask, clip: float = 0.2, clip_high: float | None = None,
                        num_tokens: torch.Tensor | None = None):
    """The clipped surrogate, averaged over the response tokens: L = E_t[l_t] (`token_mean`).

    Returns the loss and the clip fraction (share of tokens where the clipped term is chosen)."""
    losses, is_clipped = clipped_surrogate(log_probs, old_log_probs, advantages, clip, clip_high, mask)
    return token_mean(losses, mask, num_tokens), token_mean(is_clipped.float(), mask, num_tokens)


def clipped_value_loss(values, old_values, returns, mask, clip: float = 0.2, num_tokens: torch.Tensor | None = None):
    """The clipped value loss of PPO's reference code (baselines ppo2), as in Ziegler et al.:

        L = 1/2 E_t[ max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -eps, eps) - R_t)^2) ]

    Returns the loss and the share of tokens where the clipped term is chosen."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    return loss, token_mean((clipped > unclipped).float(), mask, num_tokens)


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def check_temperature(temperature: float):
    """RL scores samples under softmax(logits / T): T = 0 (greedy) has no such policy to optimise."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for RL (the policy is softmax(logits / T)), got {temperature}; "
                         "greedy decoding (temperature=0) is for generate only")


def response_mask(tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(b, r) sampled tokens -> (b, r) bool, True up to and including each row's first EOS (all
    True without an EOS id)."""
    if eos_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = tokens == eos_id
    return (is_eos.long().cumsum(dim=-1) - is_eos.long()) == 0


class KLController:
    """beta of the KL penalty: fixed, or adaptive with `target` (Ziegler et al. 2019, eq. 2):

        e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int):
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------
# actor and critic on one base


class Actor(nn.Module):
    """The policy: a LoRA scope on `palm`."""

    def __init__(self, palm: PaLM, actor_scope: str):
        super().__init__()
        self.palm, self.actor_scope = palm, actor_scope

    def forward(self, seq, mask, start: int, temperature: float):
        """seq, mask (b, n); the response is seq[:, start:]. Returns, for each response token,
        its log-prob under softmax(logits / T) and the policy's entropy there: two (b, n - start) tensors."""
        logits = self.palm(seq[:, :-1], mask=mask[:, :-1], finetune_scope=self.actor_scope)[:, start - 1:]
        log_probs_all = (logits.float() / temperature).log_softmax(dim=-1)  # (b, r, v)
        log_probs = log_probs_all.gather(-1, seq[:, start:, None]).squeeze(-1)
        entropy = -(log_probs_all.exp() * log_probs_all).sum(dim=-1)
        return log_probs, entropy

    def actor_parameters(self):
        return self.palm.finetune_parameters(self.actor_scope)


class ActorCritic(Actor):
    """The actor and a critic (its own LoRA scope on the same `palm`, or a separate `critic_palm`)
    with a zero-initialised value head, so the values start at 0."""

    def __init__(self, palm: PaLM, actor_scope: str, critic_scope: str, critic_palm: PaLM | None = None):
        super().__init__(palm, actor_scope)
        self.critic_palm, self.critic_scope = critic_palm, critic_scope
        self.value_head = nn.Linear((critic_palm or palm).dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, seq, mask, start: int, temperature: float):
        """The actor's log-probs and entropy, and the value of the state before each response
        token: three (b, n - start) tensors."""
        return *super().forward(seq, mask, start, temperature), self.values(seq, mask, start)

    def values(self, seq, mask, start: int):
        critic = self.critic_palm or self.palm
        scope = None if self.critic_palm is not None else self.critic_scope
        embeds = critic(seq[:, :-1], mask=mask[:, :-1], finetune_scope=scope, return_only_embedding=True)
        return self.value_head(embeds[:, start - 1:]).squeeze(-1).float()  # (b, r)

    def critic_parameters(self):
        critic = list(self.critic_palm.parameters()) if self.critic_palm is not None else \
            self.palm.finetune_parameters(self.critic_scope)
        return critic + list(self.value_head.parameters())


# ---------------------------------------------------------------------------------------------------
# rollout storage


class RolloutTensors:
    """What a rollout dataclass with `seq`, `mask` (b, n) and the response `start` offers: its
    tensors by name (None fields left out), a minibatch of them, the response texts."""

    def tensor_names(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def minibatch(self, index: torch.Tensor, device) -> dict:
        return {name: getattr(self, name)[index].to(device) for name in self.tensor_names()}

    def responses(self, tokenizer) -> list[str]:
        response_tokens = self.mask.clone()
        response_tokens[:, : self.start] = False
        return decode_responses(self.seq, response_tokens, tokenizer)

    def prompt_texts(self, tokenizer) -> list[str]:
        """The text of each row's prompt (its leading EOS, the begin-of-document token, decodes to nothing)."""
        prompt_tokens = self.mask.clone()
        prompt_tokens[:, self.start :] = False
        return [tokenizer.decode(s[m][1:]) for s, m in zip(self.seq.cpu(), prompt_tokens.cpu())]


@dataclass
class Rollout(RolloutTensors):
    """One batch of experience. seq, mask (b, n); the rest (b, r) for the response seq[:, start:]."""

    seq: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    start: int
    temperature: float


def memmap_rollout(rollout: Rollout, directory) -> Rollout:
    """The same rollout backed by .npy memory-mapped files in `directory`, so long runs with large
    rollouts keep them on disk; minibatches are read from the files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = {}
    for name in rollout.tensor_names():
        array = getattr(rollout, name).detach().cpu().numpy()
        mapped = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=array.dtype, shape=array.shape)
        mapped[:] = array
        mapped.flush()
        stored[name] = torch.from_numpy(mapped)
    return Rollout(**stored, start=rollout.start, temperature=rollout.temperature)


# ---------------------------------------------------------------------------------------------------
# helpers


def decode_responses(seq: torch.Tensor, response_mask: torch.Tensor, tokenizer) -> list[str]:
    """The text of each row's response tokens: seq (b, n), response_mask (b, n) True at them."""
    return [tokenizer.decode(s[m]) for s, m in zip(seq.cpu(), response_mask.cpu())]


def text_reward_fn(score_texts, tokenizer=None):
    """Turns `score_texts(list of response strings) -> list of floats` into a reward_fn; `tokenizer`
    (bytes by default) decodes the responses: pass the policy's, `palm.tokenizer`."""
    tokenizer = tokenizer or ByteTokenizer()

    def reward_fn(seq, prompt_mask, mask):
        texts = decode_responses(seq, mask & ~prompt_mask, tokenizer)
        return torch.tensor(score_texts(texts), dtype=torch.float, device=seq.device)

    return reward_fn


def prompt_list(prompt_token_ids, prompts, tokenizer, pad_id: int) -> list[torch.Tensor]:
    """Prompts as 1-D token tensors; text prompts start with EOS, the begin-of-document token.
    A (b, n) tensor of token ids loses every `pad_id`, wherever it is."""
    if (prompt_token_ids is None) == (prompts is None):
        raise ValueError("pass exactly one of prompt_token_ids (token ids) or prompts (text)")
    if prompts is not None and tokenizer is None:
        raise ValueError("text prompts need a tokenizer: pass tokenizer=, set palm.tokenizer, or pass prompt_token_ids")
    if prompts is not None:
        ids = [torch.cat((torch.tensor([tokenizer.eos_id]), tokenizer.encode(p))) for p in prompts]
    elif isinstance(prompt_token_ids, torch.Tensor):
        rows = prompt_token_ids if prompt_token_ids.ndim == 2 else prompt_token_ids[None]
        ids = [row[row != pad_id] for row in rows]  # (b, n) padded with PAD, either side
    else:
        ids = [torch.as_tensor(p, dtype=torch.long) for p in prompt_token_ids]
    if not ids or any(len(p) == 0 for p in ids):
        raise ValueError("prompts must be a non-empty collection of non-empty prompts")
    return [p.long().cpu() for p in ids]


def prompt_mask_before(mask: torch.Tensor, start: int) -> torch.Tensor:
    """mask (b, n) -> (b, n) True at the real tokens before `start`, where the responses begin."""
    return (torch.arange(mask.shape[1], device=mask.device) < start).expand_as(mask) & mask


# ---------------------------------------------------------------------------------------------------
# the trainers


class Normalizers(NamedTuple):
    """What a minibatch's losses are divided by: its response tokens and its responses, counted over
    every micro-batch and every process, per process (DDP averages the processes' gradients)."""

    tokens: torch.Tensor
    responses: torch.Tensor


class PolicyTrainer:
    """What the RL trainers share: prompts, a reward (a reward model,
    `reward_model.score(seq, prompt_mask=, mask=) -> (b,)`, or a `reward_fn` of the same signature),
    the accelerator, KV-cached sampling from the actor scope with a fixed response budget, scoring,
    the update loop (epochs x minibatches, each an optimizer step over micro-batches), best-of-N,
    and the tuned policy as a plain PaLM. A subclass adds its scopes, its optimizer, its `loss` of a
    micro-batch and `step`."""

    def __init__(self, *, palm: PaLM, reward_model, reward_fn, prompt_token_ids, prompts, tokenizer, actor_scope: str,
                 seed: int, accelerator: Accelerator | None, accelerate_kwargs: dict | None = None,
                 prompt_pad_id: int | None = None, epochs: int = 1, minibatch_size: int = 16,
                 micro_batch_size: int | None = None):
        """tokenizer: by default palm.tokenizer (bytes for the byte vocabulary, what a checkpoint was saved
        with, or none: token-id prompts, and no EOS unless `train(eos_token=)` names one). prompt_pad_id: the id stripped
        from a padded prompt_token_ids tensor (default palm.pad_id). micro_batch_size: responses per
        forward and backward within a minibatch (None: the whole minibatch at once); the gradient of
        the optimizer step is the same either way."""
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("pass exactly one of reward_model or reward_fn")
        self.epochs, self.minibatch_size, self.micro_batch_size = epochs, minibatch_size, micro_batch_size
        # iteration i draws its prompts and samples from (seed, i, process index): each process its
        # own, and a resumed run (which sets `iteration`) draws what an uninterrupted one would
        self.seed, self.iteration = seed, 0
        self.accelerator = accelerator or Accelerator(**(accelerate_kwargs or {}))
        self.tokenizer = tokenizer or palm.tokenizer
        if self.tokenizer is not None:
            check_vocab_size(self.tokenizer, palm.num_tokens, where="the policy")
        self.eos_id = None if self.tokenizer is None else self.tokenizer.eos_id  # where sampled responses end
        pad_id = palm.pad_id if prompt_pad_id is None else prompt_pad_id
        self.prompts = prompt_list(prompt_token_ids, prompts, self.tokenizer, pad_id)
        self.longest_prompt = max(len(p) for p in self.prompts)
        self.palm, self.reward_model, self.actor_scope = palm, reward_model, actor_scope
        self.reward_fn = reward_model.score if reward_model is not None else reward_fn
        if reward_model is not None:  # frozen; it usually shares this base, whose scopes come next
            reward_model.requires_grad_(False).eval().to(self.accelerator.device)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def unwrapped(self):
        """The subclass's trained module (`prepared`, as Accelerate wrapped it) as it was built."""
        return self.accelerator.unwrap_model(self.prepared)

    def add_scopes(self, scopes: dict):
        """LoRA scopes {name: rank} on the base (kept when resuming a trainer's palm); all else frozen."""
        for scope, r in scopes.items():
            if scope not in self.palm.finetune_modules:
                self.palm.add_finetune_params(scope, lora_r=r)
        self.palm.finetune_only(*scopes)

    def response_budget(self, max_seq_len: int) -> int:
        """New tokens per response: max_seq_len less the longest of the trainer's prompts, the same for
        every rollout (Dr. GRPO's constant, TRL's max_completion_length)."""
        budget = max_seq_len - self.longest_prompt
        if budget < 1:
            raise ValueError(f"max_seq_len {max_seq_len} leaves no room for a response: the longest prompt has "
                             f"{self.longest_prompt} tokens, so max_seq_len must be at least {self.longest_prompt + 1}")
        return budget

    def draw_prompts(self, num_prompts: int):
        """This iteration's `num_prompts` prompts, drawn with replacement, and the generator of its
        samples, both seeded from (seed, iteration, process index); advances `iteration`."""
        seed = np.random.SeedSequence([self.seed, self.iteration, self.accelerator.process_index]).generate_state(1)[0]
        self.iteration += 1
        index = torch.randint(len(self.prompts), (num_prompts,), generator=torch.Generator().manual_seed(int(seed)))
        return [self.prompts[i] for i in index.tolist()], torch.Generator(self.device).manual_seed(int(seed))

    def score(self, seq, mask, start: int) -> torch.Tensor:
        """The reward model's (or reward_fn's) score of each sequence, whose response starts at `start`: (b,)."""
        with self.accelerator.autocast():
            scores = self.reward_fn(seq, prompt_mask=prompt_mask_before(mask, start), mask=mask)
        scores = torch.as_tensor(scores, device=seq.device).float().reshape(-1)
        if scores.shape[0] != seq.shape[0]:
            raise ValueError(f"the reward gave {scores.shape[0]} scores for {seq.shape[0]} sequences")
        return scores

    def token_rewards(self, seq, mask, start: int) -> torch.Tensor | None:
        """A process reward model's reward of each response token seq[:, start:], (b, r); None when
        the reward is one score per response."""
        if not hasattr(self.reward_model, "token_rewards"):
            return None
        with self.accelerator.autocast():
            rewards = self.reward_model.token_rewards(seq, prompt_mask=prompt_mask_before(mask, start), mask=mask)
        return rewards[:, start - 1:].float()

    @torch.no_grad()
    def sample(self, prompts: list[torch.Tensor], max_new_tokens: int, temperature: float = 1.0, group_size: int = 1,
               **sampling):
        """`group_size` responses of at most `max_new_tokens` from the actor to each prompt, prompt i's in
        rows i * G .. i * G + G - 1 (each prompt encoded once, its KV cache shared): seq, mask (b * G, n)
        (prompt left-padded, response right-padded after its EOS) and the response start."""
        prompt, prompt_mask = (t.to(self.device) for t in left_pad(prompts, self.palm.pad_id))
        tokens = self.palm.generate(prompt.shape[1] + max_new_tokens, prompt=prompt, prompt_mask=prompt_mask, temperature=temperature,
                                    eos_token=self.eos_id, finetune_scope=self.actor_scope,
                                    num_samples_per_prompt=group_size, **sampling)
        prompt, prompt_mask = prompt.repeat_interleave(group_size, dim=0), prompt_mask.repeat_interleave(group_size, dim=0)
        responses_mask = response_mask(tokens, self.eos_id)
        length = int(responses_mask.sum(dim=1).max())  # drop columns that are padding in every row
        seq = torch.cat((prompt, tokens[:, :length]), dim=1)
        mask = torch.cat((prompt_mask, responses_mask[:, :length]), dim=1)
        return seq, mask, prompt.shape[1]

    def ended(self, seq, start: int) -> torch.Tensor:
        """(b,) bool: whether each response seq[:, start:] emitted EOS."""
        if self.eos_id is None:
            return torch.zeros(len(seq), dtype=torch.bool, device=seq.device)
        return (seq[:, start:] == self.eos_id).any(dim=1)

    def reduce_stats(self, stats: dict) -> dict:
        """Each diagnostic averaged over processes, so every process sees the same values. Every
        process samples the same number of responses, so a mean over responses (score, KL, length)
        is the mean over all of them; a mean over tokens is the mean of the processes' means."""
        return {k: float(self.accelerator.reduce(torch.tensor(float(v), device=self.device), "mean")) for k, v in stats.items()}

    def learn(self, rollout) -> dict:
        """Step 5: `epochs` passes over the rollout in minibatches, one optimizer step each; returns the
        losses and diagnostics averaged over the steps."""
        # without dropout, as the rollout: the ratio must compare one function at two parameter
        # settings, so that it is exactly 1 before the first step (TRL disables dropout likewise)
        self.prepared.eval()
        totals, steps = {}, 0
        for _ in range(self.epochs):
            for index in torch.randperm(len(rollout.seq)).split(self.minibatch_size):
                for name, value in self.optimizer_step(rollout, index).items():
                    totals[name] = totals.get(name, 0.0) + value
                steps += 1
        return {name: total / steps for name, total in totals.items()}

    def optimizer_step(self, rollout, index: torch.Tensor) -> dict:
        """One optimizer step on the responses `index` of the rollout, in micro-batches of
        `micro_batch_size`. Each micro-batch's loss is divided by the whole minibatch's counts over
        all processes (`normalizers`), so the gradient equals that of the minibatch in one pass on one
        process, for every aggregation (Accelerate and DDP each divide a per-part mean instead)."""
        normalizers = self.normalizers(rollout.mask[index, rollout.start:].to(self.device))
        totals = {}
        for micro in index.split(self.micro_batch_size or len(index)):
            loss, diagnostics = self.loss(rollout.minibatch(micro, self.device), rollout, normalizers)
            self.accelerator.backward(loss)
            for name, value in diagnostics.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def normalizers(self, response_mask: torch.Tensor) -> Normalizers:
        """This process's share of the minibatch's response tokens and responses over all processes."""
        counts = torch.stack((response_mask.sum(), torch.tensor(response_mask.shape[0], device=response_mask.device))).float()
        counts = self.accelerator.reduce(counts, "sum") / self.accelerator.num_processes
        return Normalizers(tokens=counts[0].clamp(min=1), responses=counts[1])

    def run_iterations(self, iterations: int, desc: str, callback=None, **step_kwargs) -> list[dict]:
        """`iterations` calls of `self.step(**step_kwargs)`, `callback(iteration, stats, rollout)` after
        each; returns the diagnostics of every iteration."""
        history = []
        progress = tqdm(range(iterations), desc=desc, disable=not self.accelerator.is_local_main_process)
        for iteration in progress:
            stats, rollout = self.step(**step_kwargs)
            history.append(stats)
            progress.set_postfix({k: f"{stats[k]:.3f}" for k in ("score", "kl") if k in stats})
            if callback is not None:
                callback(iteration, stats, rollout)
        return history

    @torch.no_grad()
    def generate(self, max_seq_len: int, prompt, num_samples: int = 4, temperature: float = 1.0,
                 return_scores: bool = False, **sampling):
        """Best-of-N: samples `num_samples` responses to one prompt (1-D token ids, or text) and
        returns the sequence (prompt + response, up to EOS) the reward scores highest; with
        `return_scores`, also every sample's score (num_samples,) and the index chosen."""
        if isinstance(prompt, str):
            prompt = prompt_list(None, [prompt], self.tokenizer, self.palm.pad_id)[0]
        if prompt.ndim != 1:
            raise ValueError("generate takes one prompt (a 1-D tensor or a string)")
        if max_seq_len <= len(prompt):
            raise ValueError(f"max_seq_len {max_seq_len} leaves no room for a response after a prompt of {len(prompt)} tokens")
        seq, mask, start = self.sample([prompt.cpu()], max_seq_len - len(prompt), temperature, group_size=num_samples, **sampling)
        scores = self.score(seq, mask, start)
        best = int(scores.argmax())
        best_seq = seq[best][mask[best]]
        return (best_seq, scores, best) if return_scores else best_seq

    def policy(self) -> PaLM:
        """A copy of the tuned policy with the actor adapters merged and no other scope: a plain PaLM.
        Sharded weights (ZeRO-3, FSDP) are gathered: call it on every process then; the main
        process's copy is the policy."""
        policy = whole_copy(self.accelerator, self.prepared, self.palm)
        policy.merge_finetune_params(self.actor_scope)
        for scope in list(policy.finetune_modules):
            policy.remove_finetune_params(scope)
        return policy.requires_grad_(True)

    def save_policy(self, path):
        """Saves `policy()` with PaLM.save: PaLM.from_pretrained(path) loads it. Call it on every
        process; the main process writes."""
        policy = self.policy()
        if self.accelerator.is_main_process:
            policy.save(path)


class RLHFTrainer(PolicyTrainer):
    """PPO on a PaLM with a reward model (`reward_model.score(seq, prompt_mask=, mask=) -> (b,)`,
    with `token_rewards` a process reward model) or a programmatic `reward_fn` of the same signature.
    Only the actor and critic adapters (and value head) are trained; the base and the reward model
    stay frozen. PaLM-rlhf-pytorch's keywords are taken too (compat.RLHF_TRAINER)."""

    @upstream_keywords(RLHF_TRAINER, rlhf_trainer_inputs)
    @beartype
    def __init__(
        self,
        *,
        palm: PaLM,
        reward_model: nn.Module | None = None,
        reward_fn=None,
        prompt_token_ids=None,
        prompts: list[str] | None = None,
        tokenizer=None,
        critic_palm: PaLM | None = None,
        actor_lora_r: int = 8,
        critic_lora_r: int = 8,
        actor_lora_scope: str = "actor",
        critic_lora_scope: str = "critic",
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        weight_decay: float = 0.0,
        critic_weight_decay: float | None = None,
        betas: tuple = (0.9, 0.95),
        beta: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        kl_estimator: str = "k1",
        gamma: float = 1.0,
        lam: float = 0.95,
        eps_clip: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        max_norm: float | None = None,
        epochs: int = 4,
        minibatch_size: int = 16,
        micro_batch_size: int | None = None,
        missing_eos_penalty: float | None = None,
        rollout_memmap_dir: str | Path | None = None,
        prompt_pad_id: int | None = None,
        seed: int = 0,
        accelerator: Accelerator | None = None,
        accelerate_kwargs: dict | None = None,
    ):
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # fails early on an unknown name
        super().__init__(palm=palm, reward_model=reward_model, reward_fn=reward_fn, prompt_token_ids=prompt_token_ids,
                         prompts=prompts, tokenizer=tokenizer, actor_scope=actor_lora_scope, seed=seed,
                         accelerator=accelerator, accelerate_kwargs=accelerate_kwargs, prompt_pad_id=prompt_pad_id,
                         epochs=epochs, minibatch_size=minibatch_size, micro_batch_size=micro_batch_size)
        self.kl = KLController(beta, kl_target, kl_horizon)
        self.kl_estimator, self.gamma, self.lam = kl_estimator, gamma, lam
        self.eps_clip, self.value_clip, self.vf_coef, self.entropy_coef = eps_clip, value_clip, vf_coef, entropy_coef
        self.max_norm = max_norm
        self.missing_eos_penalty, self.rollout_memmap_dir = missing_eos_penalty, rollout_memmap_dir

        # everything frozen but the two scopes
        scopes = {actor_lora_scope: actor_lora_r}
        if critic_palm is None:
            scopes[critic_lora_scope] = critic_lora_r
        else:
            critic_palm.requires_grad_(True)  # a separate critic is small and trained whole
        self.add_scopes(scopes)
        actor_critic = ActorCritic(palm, actor_lora_scope, critic_lora_scope, critic_palm)
        optimizer = torch.optim.AdamW([
            dict(params=actor_critic.actor_parameters(), lr=actor_lr),
            dict(params=actor_critic.critic_parameters(), lr=critic_lr,
                 weight_decay=weight_decay if critic_weight_decay is None else critic_weight_decay),
        ], weight_decay=weight_decay, betas=betas)
        self.actor_critic, self.optimizer = self.accelerator.prepare(actor_critic, optimizer)

    @property
    def prepared(self) -> ActorCritic:  # as Accelerate wrapped it: DDP, a DeepSpeed engine, FSDP
        return self.actor_critic

    @torch.no_grad()
    def rollout(self, prompts: list[torch.Tensor], max_seq_len: int, temperature: float = 1.0, generator=None):
        """Steps 1-4 for a batch of prompts (sampled with `generator`) -> (Rollout, diagnostics)."""
        check_temperature(temperature)
        self.actor_critic.eval()
        # 1. sample; log-probs recomputed by a forward pass so the first PPO ratio is exactly 1
        seq, mask, start = self.sample(prompts, self.response_budget(max_seq_len), temperature, generator=generator)
        resp_mask = mask[:, start:]  # (b, r)
        with self.accelerator.autocast():
            log_probs, entropy, values = self.unwrapped(seq, mask, start, temperature)  # 3. values too
            ref_log_probs = self.palm.log_probs(seq, mask, temperature, disable_lora=True)[:, start - 1:]
        # 2. reward: -beta * KL per token, the score on the last response token (or a process
        # reward model's reward on every token)
        dense = self.token_rewards(seq, mask, start)
        scores = dense.sum(dim=1) if dense is not None else self.score(seq, mask, start)
        ended = self.ended(seq, start)
        penalty = 0.0 if self.missing_eos_penalty is None else self.missing_eos_penalty * (~ended).float()
        scores = scores - penalty
        kl = kl_penalty(log_probs, ref_log_probs, self.kl_estimator, resp_mask)
        rewards = -self.kl.beta * kl
        last = resp_mask.sum(dim=1) - 1
        if dense is not None:
            rewards = rewards + dense * resp_mask
        rewards[torch.arange(len(seq)), last] += scores if dense is None else -penalty
        # 4. GAE, returns, whitened advantages
        advantages, returns = gae(rewards, values, resp_mask, self.gamma, self.lam)
        stats = dict(
            score=scores.mean(), kl=kl.sum(dim=1).mean(), beta=self.kl.beta,
            response_length=resp_mask.sum(dim=1).float().mean(), ended_with_eos=ended.float().mean(),
            entropy=masked_mean(entropy, resp_mask), explained_variance=explained_variance(values, returns, resp_mask),
        )
        rollout = Rollout(seq, mask, log_probs, values, masked_whiten(advantages, resp_mask), returns, start, temperature)
        return rollout, {k: float(v) for k, v in stats.items()}

    def loss(self, mb: dict, rollout: Rollout, normalizers: Normalizers):
        """Step 5 on one micro-batch: the clipped policy loss, the clipped value loss and the entropy
        bonus, each a mean over the minibatch's tokens -> (loss, diagnostics)."""
        resp_mask, tokens = mb["mask"][:, rollout.start:], normalizers.tokens
        with self.accelerator.autocast():
            log_probs, entropy, values = self.actor_critic(mb["seq"], mb["mask"], rollout.start, rollout.temperature)
        policy_loss, clip_fraction = clipped_policy_loss(log_probs, mb["log_probs"], mb["advantages"], resp_mask,
                                                         self.eps_clip, num_tokens=tokens)
        value_loss, value_clip_fraction = clipped_value_loss(values, mb["values"], mb["returns"], resp_mask,
                                                             self.value_clip, num_tokens=tokens)
        loss = policy_loss + self.vf_coef * value_loss - self.entropy_coef * token_mean(entropy, resp_mask, tokens)
        # 6. diagnostics; approx KL(old || new) is the k3 estimate on the old policy's samples
        approx_kl = token_mean(kl_penalty(mb["log_probs"], log_probs.detach(), "k3", resp_mask), resp_mask, tokens)
        return loss, dict(policy_loss=policy_loss, value_loss=value_loss, approx_kl=approx_kl,
                          clip_fraction=clip_fraction, value_clip_fraction=value_clip_fraction)

    def clip_gradients(self):
        if self.max_norm is not None:
            # unscaled once (fp16's GradScaler refuses a second unscale_ of one optimizer before its
            # step), then actor and critic clipped separately
            self.accelerator.unscale_gradients(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.unwrapped.actor_parameters(), self.max_norm)
            torch.nn.utils.clip_grad_norm_(self.unwrapped.critic_parameters(), self.max_norm)

    def step(self, max_seq_len: int, rollout_batch_size: int = 16, temperature: float = 1.0):
        """One PPO iteration on `rollout_batch_size` prompts drawn for this process -> (diagnostics, rollout)."""
        prompts, generator = self.draw_prompts(rollout_batch_size)
        rollout, stats = self.rollout(prompts, max_seq_len, temperature, generator=generator)
        if self.rollout_memmap_dir is not None:
            rollout = memmap_rollout(rollout, self.rollout_memmap_dir)
        stats.update(self.learn(rollout))
        # every process sees the same diagnostics, so beta stays the same everywhere; each process
        # drew its own episodes, so the controller counts those of all of them
        stats = self.reduce_stats(stats)
        self.kl.update(stats["kl"], rollout_batch_size * self.accelerator.num_processes)
        return stats, rollout

    @upstream_keywords(PPO_TRAIN, ppo_episodes)
    def train(self, num_episodes: int = 1024, max_seq_len: int = 64, rollout_batch_size: int = 16,
              temperature: float = 1.0, eos_token: int | None = None, callback=None) -> list[dict]:
        """PPO for `num_episodes` sampled responses (one episode = one prompt and its response),
        in iterations of `rollout_batch_size`. `eos_token` (default the tokenizer's) ends a response.
        `callback(iteration, stats, rollout)` runs after each. Returns the diagnostics of every
        iteration. PaLM-rlhf-pytorch's `max_timesteps` / `update_timesteps` are mapped by
        compat.ppo_episodes."""
        if eos_token is not None:
            self.eos_id = eos_token
        iterations = max(1, math.ceil(num_episodes / rollout_batch_size))
        return self.run_iterations(iterations, "ppo", callback, max_seq_len=max_seq_len,
                                   rollout_batch_size=rollout_batch_size, temperature=temperature)
