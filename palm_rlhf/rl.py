"""What PPO (ppo.py) and the group-relative methods (grpo.py) share, in the order an iteration uses it:

    1. prompts: text (each encoded as [EOS] + its tokens) or token ids, drawn with replacement from
       (seed, iteration, process index), so each process draws its own and a resumed run what an
       uninterrupted one would
    2. rollout: responses sampled from the actor scope with the KV-cached sampler, at temperature T,
       each at most the fixed response budget (max_seq_len less the longest prompt) and cut after its
       first EOS; their log-probs re-computed by a forward pass, so the first ratio is exactly 1,
       and the frozen reference's (the base, adapters disabled: Hydra-RLHF, Santacroce et al. 2023)
    3. scores: a reward model's `score(seq, prompt_mask=, mask=)` or any reward_fn of that signature,
       less `missing_eos_penalty` for a response that never ended (Huang et al. 2024)
    4. the update: `epochs` passes in minibatches, each one optimizer step over micro-batches whose
       losses are divided by the whole minibatch's counts over every process (`Normalizers`), so that
       gradient accumulation and data parallelism change nothing; each method supplies `loss`
    5. the tuned policy: the actor's adapters merged into a plain PaLM; best-of-N by the reward

The masked maths both methods use sit here as small functions: masked means, the k1/k2/k3 KL
estimators (Schulman 2020), PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with DAPO's
clip-higher (Yu et al. 2025). Masks are bool, True at response tokens.
"""
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from palm_rlhf.checkpoint import whole_copy
from palm_rlhf.config import check_settings, require, setting
from palm_rlhf.model import PaLM, token_log_probs
from palm_rlhf.rollout_precision import CORRECTIONS, ROLLOUT_DTYPES, RolloutCopy, importance_weights, mismatch_stats
from palm_rlhf.tokenizer import ByteTokenizer, check_vocab_size, pad

# ---------------------------------------------------------------------------------------------------
# the maths



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


class KLController:
    """beta of the KL penalty: fixed, or adaptive with `target` (Ziegler et al. 2019, eq. 2):

        e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- max(beta * (1 + e * n_steps / horizon), floor * beta_0)

    KL is the mean summed KL of a response, n_steps the responses it was measured on, beta_0 the
    starting beta. The floor is ours: early in a run the KL is low because the policy has not moved
    yet, not because beta is too high, and without a floor beta keeps falling then and lets the KL
    overshoot later."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000, floor: float = 0.0):
        self.beta, self.target, self.horizon, self.min_beta = beta, target, horizon, floor * beta

    def update(self, kl: float, n_steps: int):
        if self.target is not None and self.beta > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta = max(self.beta * (1 + error * n_steps / self.horizon), self.min_beta)


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




# ---------------------------------------------------------------------------------------------------
# the policy, rollouts, prompts



class Actor(nn.Module):
    """The policy: a LoRA scope on `palm`."""

    def __init__(self, palm: PaLM, actor_scope: str):
        super().__init__()
        self.palm, self.actor_scope = palm, actor_scope

    def forward(self, seq, mask, start: int, temperature: float):
        """seq, mask (b, n); the response is seq[:, start:]. Returns, for each response token,
        its log-prob under softmax(logits / T) and the policy's entropy there: two (b, n - start) tensors."""
        logits = self.palm(seq[:, :-1], mask=mask[:, :-1], finetune_scope=self.actor_scope)[:, start - 1:]
        return token_log_probs(logits, seq[:, start:], temperature, with_entropy=True)

    def actor_parameters(self):
        return self.palm.finetune_parameters(self.actor_scope)



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
        ids = [tokenizer.encode_prompt(p) for p in prompts]
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
# the settings both methods have


@dataclass
class RLConfig:
    """The settings PPO and the group methods share: the run's length, the response budget, the
    sampling, the batches of the update."""

    iterations: int = setting(150, "iterations: a rollout, then the updates on it", at_least=1)
    max_seq_len: int = setting(48, "the longest prompt + the response budget, in tokens: each response gets at most max_seq_len - the longest training prompt (48 - 17 = 31 BPE tokens hold most review snippets; with a byte-level LM use about 160)", at_least=2)
    temperature: float = setting(1.0, "sampling temperature of rollouts; the policy is softmax(logits / T)", above=0)
    epochs: int = setting(1, "passes over each rollout batch", at_least=1)
    minibatch_size: int = setting(16, "responses per optimizer step", at_least=1)
    micro_batch_size: int | None = setting(None, "responses per forward and backward within a minibatch (none: the whole minibatch); the gradient is the same either way", at_least=1)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", at_least=0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's beta1,beta2")
    lr_schedule: str = setting("constant", "learning rate over the iterations: constant, or linear (from lr down to lr / iterations at the last, as lm-human-preferences anneals it)", choices=("constant", "linear"))
    kl_target: float | None = setting(8.0, "target KL per response (nats) of an adaptive beta (Ziegler et al. eq. 2); none keeps beta fixed", above=0)
    kl_horizon: int = setting(150, "horizon of the adaptive beta, in responses: the larger, the slower it moves", at_least=1)
    kl_beta_floor: float = setting(0.5, "the adaptive beta never falls below this fraction of its starting beta", at_least=0, at_most=1)
    missing_eos_penalty: float | None = setting(None, "subtracted from the score of a response without EOS (none disables)")
    seed: int = setting(0, "seed of sampling and prompt order")
    rollout_dtype: str = setting("fp32", "precision of the sampler: fp32 (the learner itself), or bf16 (a bf16 copy of the base with the current adapters merged, refreshed after each update; the learner still scores in fp32)", choices=tuple(ROLLOUT_DTYPES))
    rollout_correction: str = setting("none", "importance weights for the sampler-learner mismatch (rollout_precision.py): none, token_tis (min(rho, cap), Yao et al. 2025), token_mis (rho, 0 past the cap), sequence_tis, sequence_mis (the same on each response's product of ratios)", choices=CORRECTIONS)
    rollout_correction_cap: float = setting(2.0, "the cap C of rollout_correction; also where sampler_past_cap counts a token", above=0)

    def __post_init__(self):
        check_settings(self)
        if self.micro_batch_size is not None:
            require(self.micro_batch_size <= self.minibatch_size, "micro_batch_size", self.micro_batch_size,
                    f"must be <= minibatch_size ({self.minibatch_size})")



@dataclass
class Samples:
    """A rollout's responses and what both methods compute from them: seq, mask (b, n); log-probs,
    entropy, (PPO's) values and the reference's log-probs (b, r) of the response seq[:, start:], at
    most `budget` tokens; scores, the missing-EOS penalty and whether each ended (b,); a process
    reward model's per-token rewards (b, r), or None; the sampler's log-probs of the response
    tokens (b, r) and the importance weights that correct for it (rollout_precision.py), or None."""

    seq: torch.Tensor
    mask: torch.Tensor
    start: int
    budget: int
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    ended: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    sampler_log_probs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask[:, self.start :]

    def stats(self) -> dict:
        """What both methods log of a rollout, this process's means (each adds its score and KL)."""
        return dict(response_length=self.response_mask.sum(dim=1).float().mean(), ended_with_eos=self.ended.float().mean(),
                    entropy=masked_mean(self.entropy, self.response_mask))


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

    def __init__(self, *, palm: PaLM, reward_model, reward_fn, prompt_token_ids, prompts, tokenizer, config: RLConfig,
                 actor_scope: str, accelerator: Accelerator | None, accelerate_kwargs: dict | None = None,
                 prompt_pad_id: int | None = None):
        """tokenizer: by default palm.tokenizer (bytes for the byte vocabulary, what a checkpoint was saved
        with, or none: token-id prompts, and no EOS unless `train(eos_token=)` names one). prompt_pad_id: the id stripped
        from a padded prompt_token_ids tensor (default palm.pad_id)."""
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("pass exactly one of reward_model or reward_fn")
        self.config = config
        # iteration i draws its prompts and samples from (seed, i, process index): each process its
        # own, and a resumed run (which sets `iteration`) draws what an uninterrupted one would
        self.iteration = 0
        # optimizer steps taken: the bf16 sampler (made at the first rollout) is refreshed when it lags them
        self.updates, self.rollout_copy = 0, None
        self.accelerator = accelerator or Accelerator(**(accelerate_kwargs or {}))
        self.tokenizer = tokenizer or palm.tokenizer
        if self.tokenizer is not None:
            check_vocab_size(self.tokenizer, palm.num_tokens, where="the policy")
        self.eos_id = None if self.tokenizer is None else self.tokenizer.eos_id  # where sampled responses end
        pad_id = palm.pad_id if prompt_pad_id is None else prompt_pad_id
        self.prompts = prompt_list(prompt_token_ids, prompts, self.tokenizer, pad_id)
        self.longest_prompt = max(len(p) for p in self.prompts)
        self.response_budget(config.max_seq_len)  # refuses a window without room for a response, now
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

    def draw_prompts(self, num_prompts: int, sampling_round: int = 0):
        """This iteration's `num_prompts` prompts, drawn with replacement, and the generator of its
        samples, both seeded from (seed, iteration, process index); advances `iteration`. A later
        `sampling_round` (DAPO's dynamic sampling) draws more for the iteration just drawn, from
        (seed, iteration, process index, round)."""
        if sampling_round == 0:
            self.iteration += 1
        key = [self.config.seed, self.iteration - 1, self.accelerator.process_index] + ([sampling_round] if sampling_round else [])
        seed = np.random.SeedSequence(key).generate_state(1)[0]
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

    def sampler(self) -> tuple[PaLM, str | None]:
        """The model rollouts sample from and its scope: the actor scope of the learner itself, or with
        rollout_dtype bf16 the copy (rollout_precision.py), refreshed first if an update came since."""
        if self.config.rollout_dtype == "fp32":
            return self.palm, self.actor_scope
        if self.rollout_copy is None:
            self.rollout_copy = RolloutCopy(self.palm, self.actor_scope, ROLLOUT_DTYPES[self.config.rollout_dtype])
        if self.rollout_copy.version != self.updates:
            self.rollout_copy.refresh(self.updates)
        return self.rollout_copy.model, None

    @torch.no_grad()
    def sample(self, prompts: list[torch.Tensor], max_new_tokens: int, temperature: float = 1.0, group_size: int = 1,
               with_log_probs: bool = False, **sampling):
        """`group_size` responses of at most `max_new_tokens` from the actor to each prompt, prompt i's in
        rows i * G .. i * G + G - 1 (each prompt encoded once, its KV cache shared): seq, mask (b * G, n)
        (prompt left-padded, response right-padded after its EOS) and the response start; with
        `with_log_probs`, also the sampler's log-probs of the response tokens (b * G, n - start)."""
        model, scope = self.sampler()
        prompt, prompt_mask = (t.to(self.device) for t in pad(prompts, self.palm.pad_id, side="left"))
        sampled = model.generate(prompt.shape[1] + max_new_tokens, prompt=prompt, prompt_mask=prompt_mask, temperature=temperature,
                                 eos_token=self.eos_id, finetune_scope=scope, num_samples_per_prompt=group_size,
                                 return_log_probs=with_log_probs, **sampling)
        tokens = sampled[0] if with_log_probs else sampled
        prompt, prompt_mask = prompt.repeat_interleave(group_size, dim=0), prompt_mask.repeat_interleave(group_size, dim=0)
        responses_mask = response_mask(tokens, self.eos_id)
        length = int(responses_mask.sum(dim=1).max())  # drop columns that are padding in every row
        seq = torch.cat((prompt, tokens[:, :length]), dim=1)
        mask = torch.cat((prompt_mask, responses_mask[:, :length]), dim=1)
        return (seq, mask, prompt.shape[1]) + ((sampled[1][:, :length],) if with_log_probs else ())

    @torch.no_grad()
    def sample_and_score(self, prompts: list[torch.Tensor], max_seq_len: int, temperature: float, generator,
                         group_size: int = 1, reference: bool = True) -> "Samples":
        """Steps 2-3 of the module docstring for a batch of prompts -> Samples."""
        samples = self.draw_responses(prompts, max_seq_len, temperature, generator, group_size)
        return self.forward_passes(samples, temperature, reference)

    @torch.no_grad()
    def draw_responses(self, prompts: list[torch.Tensor], max_seq_len: int, temperature: float, generator,
                       group_size: int = 1) -> "Samples":
        """Responses to a batch of prompts, their scores and missing-EOS penalties -> Samples without
        log-probs yet."""
        check_temperature(temperature)
        self.prepared.eval()
        budget = self.response_budget(max_seq_len)
        seq, mask, start, sampler_log_probs = self.sample(prompts, budget, temperature, group_size=group_size,
                                                          with_log_probs=True, generator=generator)
        ended = self.ended(seq, start)
        dense = self.token_rewards(seq, mask, start)
        scores = dense.sum(dim=1) if dense is not None else self.score(seq, mask, start)
        penalty = torch.zeros_like(scores) if self.config.missing_eos_penalty is None else \
            self.config.missing_eos_penalty * (~ended).float()
        return Samples(seq, mask, start, budget, scores=scores, penalty=penalty, ended=ended, token_rewards=dense,
                       sampler_log_probs=sampler_log_probs)

    @torch.no_grad()
    def forward_passes(self, samples: "Samples", temperature: float, reference: bool = True) -> "Samples":
        """The samples with the policy's log-probs, entropy (and PPO's values) and, with `reference`,
        the reference's log-probs, each recomputed by a forward pass so that the first ratio is exactly 1;
        and the importance weights of `rollout_correction` from them and the sampler's."""
        seq, mask, start = samples.seq, samples.mask, samples.start
        with self.accelerator.autocast():
            policy = self.unwrapped(seq, mask, start, temperature)
            ref_log_probs = self.palm.log_probs(seq, mask, temperature, disable_lora=True)[:, start - 1:] if reference else None
        is_weights = importance_weights(policy[0], samples.sampler_log_probs, samples.response_mask,
                                        self.config.rollout_correction, self.config.rollout_correction_cap)
        return replace(samples, **dict(zip(("log_probs", "entropy", "values"), policy)), ref_log_probs=ref_log_probs,
                       is_weights=is_weights)

    def rollout_stats(self, samples: "Samples") -> dict:
        """The samples' diagnostics, the sampler-learner mismatch (rollout_precision.mismatch_stats) and,
        with a bf16 sampler, what its copy costs: sampler_memory_mb, sampler_refresh_ms (its last refresh)."""
        stats = samples.stats() | mismatch_stats(samples.log_probs, samples.sampler_log_probs, samples.response_mask,
                                                 self.config.rollout_correction_cap)
        if self.rollout_copy is not None:
            stats.update(sampler_memory_mb=self.rollout_copy.memory_bytes / 2**20,
                         sampler_refresh_ms=1000 * self.rollout_copy.refresh_seconds)
        return stats

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
        self.anneal_learning_rate()
        totals, steps = {}, 0
        for _ in range(self.config.epochs):
            for index in torch.randperm(len(rollout.seq)).split(self.config.minibatch_size):
                for name, value in self.optimizer_step(rollout, index).items():
                    totals[name] = totals.get(name, 0.0) + value
                steps += 1
        return {name: total / steps for name, total in totals.items()}

    def anneal_learning_rate(self):
        """With lr_schedule linear, iteration i of n (from 1) updates at (n - i + 1) / n of each
        parameter group's starting rate, which the group keeps as `base_lr` (so that a checkpoint holds it)."""
        if self.config.lr_schedule == "constant":
            return
        remaining = max(0, self.config.iterations - self.iteration + 1) / self.config.iterations
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * remaining

    def optimizer_step(self, rollout, index: torch.Tensor) -> dict:
        """One optimizer step on the responses `index` of the rollout, in micro-batches of
        `micro_batch_size`. Each micro-batch's loss is divided by the whole minibatch's counts over
        all processes (`normalizers`), so the gradient equals that of the minibatch in one pass on one
        process, for every aggregation (Accelerate and DDP each divide a per-part mean instead)."""
        normalizers = self.normalizers(rollout.mask[index, rollout.start:].to(self.device))
        totals = {}
        for micro in index.split(self.config.micro_batch_size or len(index)):
            loss, diagnostics = self.loss(rollout.minibatch(micro, self.device), rollout, normalizers)
            self.accelerator.backward(loss)
            for name, value in diagnostics.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        if self.config.max_grad_norm > 0:
            self.clip_gradients(self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return totals

    def normalizers(self, response_mask: torch.Tensor) -> Normalizers:
        """This process's share of the minibatch's response tokens and responses over all processes."""
        counts = torch.stack((response_mask.sum(), torch.tensor(response_mask.shape[0], device=response_mask.device))).float()
        counts = self.accelerator.reduce(counts, "sum") / self.accelerator.num_processes
        return Normalizers(tokens=counts[0].clamp(min=1), responses=counts[1])

    def clip_gradients(self, max_norm: float):
        self.accelerator.clip_grad_norm_(self.unwrapped.actor_parameters(), max_norm)

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
    def generate(self, max_seq_len: int | None, prompt, num_samples: int = 4, temperature: float | None = None,
                 return_scores: bool = False, **sampling):
        """Best-of-N: samples `num_samples` responses to one prompt (1-D token ids, or text) and
        returns the sequence (prompt + response, up to EOS) the reward scores highest; with
        `return_scores`, also every sample's score (num_samples,) and the index chosen. max_seq_len
        and temperature: the config's by default."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        temperature = self.config.temperature if temperature is None else temperature
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


