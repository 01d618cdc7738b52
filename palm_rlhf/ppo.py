"""PPO for RLHF: one frozen PaLM serves as actor, critic, frozen reference and (optionally) reward model.

One iteration (`RLHFTrainer.step`), in the order of Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences") and InstructGPT (Ouyang et al. 2022), each step numbered in the code:

    1. rollout: a batch of prompts, responses sampled at temperature T with the KV-cached sampler,
       truncated after their first EOS; log-probs of the policy softmax(logits / T)
    2. per-token reward r_t = -beta * KL_t(policy || reference), plus the reward model's score on the
       last response token (or, from a process reward model with `token_rewards`, such as
       ImplicitPRM, its reward on every response token); beta adaptive towards kl_target nats per
       response (Ziegler et al. eq. 2), or fixed with kl_target=None
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
   10. The adaptive beta never falls below kl_beta_floor times its start, and its horizon is short
       (150 responses against Ziegler et al.'s 10,000): early on the KL is low because the policy
       has not moved yet, and a beta that falls then lets the KL overshoot later (docs/results.md).
   11. On several processes, each samples its own rollout and whitens its advantages over it (not
       over all processes' rollouts); the losses are means over the whole minibatch's tokens, on
       every process and over micro-batches (rl.py), so the gradient is the one-process one.

What PPO shares with the group methods (prompts, sampling, scoring, the update loop, the masked
maths) is in rl.py; this file holds PPO's own maths, its config and `RLHFTrainer`.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from beartype import beartype
from torch import nn

from palm_rlhf.config import require, setting, with_settings
from palm_rlhf.model import PaLM
from palm_rlhf.rl import (
    Actor, KLController, Normalizers, PolicyTrainer, RLConfig, RolloutTensors, clipped_surrogate, kl_penalty, masked_var,
    masked_whiten, token_mean,
)

# ---------------------------------------------------------------------------------------------------
# PPO's maths


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


def clipped_policy_loss(log_probs, old_log_probs, advantages, mask, clip: float = 0.2, clip_high: float | None = None,
                        num_tokens: torch.Tensor | None = None, weights: torch.Tensor | None = None):
    """The clipped surrogate, averaged over the response tokens: L = E_t[w_t l_t] (`token_mean`),
    w_t the rollout correction's importance weights (rollout_precision.py), 1 without them.

    Returns the loss and the clip fraction (share of tokens where the clipped term is chosen)."""
    losses, is_clipped = clipped_surrogate(log_probs, old_log_probs, advantages, clip, clip_high, mask)
    if weights is not None:
        losses = losses * weights
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


# ---------------------------------------------------------------------------------------------------
# the critic, the rollout


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


@dataclass
class Rollout(RolloutTensors):
    """One batch of experience. seq, mask (b, n); the rest (b, r) for the response seq[:, start:];
    is_weights, the rollout correction's, or None."""

    seq: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    start: int
    temperature: float
    is_weights: torch.Tensor | None = None


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
# the settings, whose defaults train_ppo.py runs with


@dataclass
class PPOConfig(RLConfig):
    """PPO's settings; the defaults are train_ppo.py's: they clear the README's bar on 5 seeds of 5
    (docs/results.md)."""

    iterations: int = setting(150, "PPO iterations (a rollout batch, then epochs x minibatches of updates)", at_least=1)
    rollout_batch_size: int = setting(32, "responses sampled per iteration and process", at_least=1)
    epochs: int = setting(2, "passes over each rollout batch", at_least=1)
    actor_lr: float = setting(1e-3, "learning rate of the actor's LoRA", above=0)
    critic_lr: float = setting(1e-3, "learning rate of the critic's LoRA and value head", above=0)
    actor_lora_r: int = setting(8, "LoRA rank of the actor", at_least=1)
    critic_lora_r: int = setting(8, "LoRA rank of the critic", at_least=1)
    actor_lora_scope: str = setting("actor", "name of the actor's fine-tune scope on the PaLM")
    critic_lora_scope: str = setting("critic", "name of the critic's fine-tune scope on the PaLM")
    weight_decay: float = setting(0.0, "AdamW weight decay of the actor", at_least=0)
    critic_weight_decay: float | None = setting(None, "AdamW weight decay of the critic (none: weight_decay)", at_least=0)
    beta: float = setting(0.2, "KL penalty coefficient (the initial value when adaptive)", at_least=0)
    kl_estimator: str = setting("k1", "the per-token KL in the reward: k1, k2 or k3 (Schulman 2020)", choices=("k1", "k2", "k3"), label="KL estimator")
    gamma: float = setting(1.0, "discount of GAE", at_least=0, at_most=1)
    lam: float = setting(0.95, "lambda of GAE", at_least=0, at_most=1)
    eps_clip: float = setting(0.2, "clip range of the policy ratio", above=0)
    value_clip: float = setting(0.2, "clip range of the value change", above=0)
    vf_coef: float = setting(0.1, "weight of the value loss", at_least=0)
    entropy_coef: float = setting(0.0, "weight of the entropy bonus", at_least=0)
    rollout_memmap_dir: str | None = setting(None, "keep rollouts in memory-mapped files in this folder")

    def __post_init__(self):
        super().__post_init__()
        require(self.minibatch_size <= self.rollout_batch_size, "minibatch_size", self.minibatch_size,
                f"must be <= rollout_batch_size ({self.rollout_batch_size}), the responses it is cut from")


# ---------------------------------------------------------------------------------------------------
# the trainer


class RLHFTrainer(PolicyTrainer):
    """PPO on a PaLM with a reward model (`reward_model.score(seq, prompt_mask=, mask=) -> (b,)`,
    with `token_rewards` a process reward model) or a programmatic `reward_fn` of the same signature.
    Only the actor and critic adapters (and value head) are trained; the base and the reward model
    stay frozen. Settings: `config` (a PPOConfig, default PPOConfig()), any of its fields as
    keywords on top of it.

        trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompts=prompts)  # train_ppo.py's settings
        history = trainer.train()                                                    # config.iterations
    """

    @beartype
    def __init__(self, *, palm: PaLM, reward_model: nn.Module | None = None, reward_fn=None, prompt_token_ids=None,
                 prompts: list[str] | None = None, tokenizer=None, critic_palm: PaLM | None = None,
                 config: PPOConfig | None = None, prompt_pad_id: int | None = None, accelerator: Accelerator | None = None,
                 accelerate_kwargs: dict | None = None, **settings):
        config = with_settings(config or PPOConfig(), settings, "RLHFTrainer")
        super().__init__(palm=palm, reward_model=reward_model, reward_fn=reward_fn, prompt_token_ids=prompt_token_ids,
                         prompts=prompts, tokenizer=tokenizer, config=config, actor_scope=config.actor_lora_scope,
                         accelerator=accelerator, accelerate_kwargs=accelerate_kwargs, prompt_pad_id=prompt_pad_id)
        self.kl = KLController(config.beta, config.kl_target, config.kl_horizon, config.kl_beta_floor)
        # everything frozen but the two scopes
        scopes = {config.actor_lora_scope: config.actor_lora_r}
        if critic_palm is None:
            scopes[config.critic_lora_scope] = config.critic_lora_r
        else:
            critic_palm.requires_grad_(True)  # a separate critic is small and trained whole
        self.add_scopes(scopes)
        actor_critic = ActorCritic(palm, config.actor_lora_scope, config.critic_lora_scope, critic_palm)
        critic_weight_decay = config.weight_decay if config.critic_weight_decay is None else config.critic_weight_decay
        optimizer = torch.optim.AdamW([
            dict(params=actor_critic.actor_parameters(), lr=config.actor_lr),
            dict(params=actor_critic.critic_parameters(), lr=config.critic_lr, weight_decay=critic_weight_decay),
        ], weight_decay=config.weight_decay, betas=config.betas)
        self.actor_critic, self.optimizer = self.accelerator.prepare(actor_critic, optimizer)

    @property
    def prepared(self) -> ActorCritic:  # as Accelerate wrapped it: DDP, a DeepSpeed engine, FSDP
        return self.actor_critic

    def rollout(self, prompts: list[torch.Tensor], max_seq_len: int | None = None, temperature: float | None = None,
                generator=None):
        """Steps 1-4 for a batch of prompts (sampled with `generator`) -> (Rollout, diagnostics)."""
        c = self.config
        temperature = c.temperature if temperature is None else temperature
        # 1. sample; the policy's log-probs (and 3. the critic's values) and the reference's
        samples = self.sample_and_score(prompts, max_seq_len or c.max_seq_len, temperature, generator)
        resp_mask, dense = samples.response_mask, samples.token_rewards  # (b, r)
        # 2. reward: -beta * KL per token, the score on the last response token (or a process
        # reward model's reward on every token)
        scores = samples.scores - samples.penalty
        kl = kl_penalty(samples.log_probs, samples.ref_log_probs, c.kl_estimator, resp_mask)
        rewards = -self.kl.beta * kl
        last = resp_mask.sum(dim=1) - 1
        if dense is not None:
            rewards = rewards + dense * resp_mask
        rewards[torch.arange(len(samples.seq)), last] += scores if dense is None else -samples.penalty
        # 4. GAE, returns, whitened advantages
        advantages, returns = gae(rewards, samples.values, resp_mask, c.gamma, c.lam)
        stats = dict(score=scores.mean(), kl=kl.sum(dim=1).mean(), beta=self.kl.beta, **self.rollout_stats(samples),
                     explained_variance=explained_variance(samples.values, returns, resp_mask))
        rollout = Rollout(samples.seq, samples.mask, samples.log_probs, samples.values, masked_whiten(advantages, resp_mask),
                          returns, samples.start, temperature, samples.is_weights)
        return rollout, {k: float(v) for k, v in stats.items()}

    def loss(self, mb: dict, rollout: Rollout, normalizers: Normalizers):
        """Step 5 on one micro-batch: the clipped policy loss, the clipped value loss and the entropy
        bonus, each a mean over the minibatch's tokens -> (loss, diagnostics)."""
        c, resp_mask, tokens = self.config, mb["mask"][:, rollout.start:], normalizers.tokens
        with self.accelerator.autocast():
            log_probs, entropy, values = self.actor_critic(mb["seq"], mb["mask"], rollout.start, rollout.temperature)
        policy_loss, clip_fraction = clipped_policy_loss(log_probs, mb["log_probs"], mb["advantages"], resp_mask,
                                                         c.eps_clip, num_tokens=tokens, weights=mb.get("is_weights"))
        value_loss, value_clip_fraction = clipped_value_loss(values, mb["values"], mb["returns"], resp_mask,
                                                             c.value_clip, num_tokens=tokens)
        loss = policy_loss + c.vf_coef * value_loss - c.entropy_coef * token_mean(entropy, resp_mask, tokens)
        # 6. diagnostics; approx KL(old || new) is the k3 estimate on the old policy's samples
        approx_kl = token_mean(kl_penalty(mb["log_probs"], log_probs.detach(), "k3", resp_mask), resp_mask, tokens)
        return loss, dict(policy_loss=policy_loss, value_loss=value_loss, approx_kl=approx_kl,
                          clip_fraction=clip_fraction, value_clip_fraction=value_clip_fraction)

    def clip_gradients(self, max_norm: float):
        # unscaled once (fp16's GradScaler refuses a second unscale_ of one optimizer before its
        # step), then actor and critic clipped separately
        self.accelerator.unscale_gradients(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.unwrapped.actor_parameters(), max_norm)
        torch.nn.utils.clip_grad_norm_(self.unwrapped.critic_parameters(), max_norm)

    def step(self, max_seq_len: int | None = None, rollout_batch_size: int | None = None, temperature: float | None = None):
        """One PPO iteration on `rollout_batch_size` prompts (the config's by default) drawn for this
        process -> (diagnostics, rollout)."""
        rollout_batch_size = rollout_batch_size or self.config.rollout_batch_size
        prompts, generator = self.draw_prompts(rollout_batch_size)
        rollout, stats = self.rollout(prompts, max_seq_len, temperature, generator=generator)
        if self.config.rollout_memmap_dir is not None:
            rollout = memmap_rollout(rollout, self.config.rollout_memmap_dir)
        stats.update(self.learn(rollout))
        # every process sees the same diagnostics, so beta stays the same everywhere; each process
        # drew its own episodes, so the controller counts those of all of them
        stats = self.reduce_stats(stats)
        self.kl.update(stats["kl"], rollout_batch_size * self.accelerator.num_processes)
        return stats, rollout

    def train(self, num_episodes: int | None = None, max_seq_len: int | None = None, rollout_batch_size: int | None = None,
              temperature: float | None = None, eos_token: int | None = None, callback=None) -> list[dict]:
        """PPO for `num_episodes` sampled responses (one episode = one prompt and its response; by
        default the config's iterations x rollout_batch_size), in iterations of `rollout_batch_size`.
        `eos_token` (default the tokenizer's) ends a response. `callback(iteration, stats, rollout)`
        runs after each. Returns the diagnostics of every iteration."""
        if eos_token is not None:
            self.eos_id = eos_token
        rollout_batch_size = rollout_batch_size or self.config.rollout_batch_size
        iterations = self.config.iterations if num_episodes is None else max(1, math.ceil(num_episodes / rollout_batch_size))
        return self.run_iterations(iterations, "ppo", callback, max_seq_len=max_seq_len,
                                   rollout_batch_size=rollout_batch_size, temperature=temperature)
