"""Rollouts sampled in bf16, the gap between the sampler and the learner, and its correction.

Sampling is over half of an RL iteration, and a bf16 matrix product is several times faster than an
fp32 one on a CPU with AVX-512 BF16 (and is how GPUs sample). But a policy sampled in one precision
and scored in another is not one policy: the responses come from pi_sampler, while the update's
ratio pi / pi_old takes pi_old from the fp32 learner. This file holds, in the order an iteration
uses them:

    1. RolloutCopy: a plain PaLM in the rollout dtype holding the base with the actor's adapters
       folded in, refreshed from the learner before a rollout whenever an optimizer step has
       changed the adapters since the last refresh. It is never trained (no adapters, no
       gradients), so the optimizer still holds exactly one copy of the policy.
    2. The mismatch, measured on the sampled tokens: mean |log pi_old - log pi_sampler|, the k3
       estimate of KL(pi_sampler || pi_old) (Schulman 2020), and the share of tokens whose ratio
       pi_old / pi_sampler passes the cap.
    3. The correction, an importance weight per token given to the clipped surrogate
       (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"):

           token_tis:     w_t = min(rho_t, C)                       rho_t = pi_old(y_t) / pi_sampler(y_t)
           token_mis:     w_t = rho_t if rho_t <= C else 0          masked (Liu et al. 2025, "When Speed
                                                                    Kills Stability"): a token past the
                                                                    cap is dropped, not down-weighted
           sequence_tis:  w_it = min(prod_t rho_it, C)               one weight per response
           sequence_mis:  w_it = prod_t rho_it if it is <= C else 0

       With w = 1 the update is the usual one; truncating at C bounds the variance a rare token
       with a large ratio would add, at the price of some bias where the ratio passes C.

Where this departs from the papers: the weights are computed once per rollout, from the learner's
log-probs before any update (pi_old), as Yao et al.; the KL-in-the-loss term and PPO's value loss
are not weighted (the KL term is an expectation under the policy, not a sampled advantage).
"""
import time
from dataclasses import replace

import torch

from palm_rlhf.checkpoint import weights_sharded
from palm_rlhf.model import PaLM

ROLLOUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CORRECTIONS = ("none", "token_tis", "token_mis", "sequence_tis", "sequence_mis")


class RolloutCopy:
    """A frozen copy of `palm` with the adapters of `scope` merged in, in `dtype`, to sample from.
    `refresh()` copies the learner's current weights into it; `memory_bytes` and `refresh_seconds`
    (the last refresh) say what it costs."""

    def __init__(self, palm: PaLM, scope: str, dtype: torch.dtype):
        if weights_sharded(palm):
            raise ValueError("rollout_dtype bf16 needs the whole policy on each process; it is not supported "
                             "with sharded weights (DeepSpeed ZeRO-3, FSDP): use rollout_dtype fp32 there")
        self.palm, self.scope = palm, scope
        self.model = PaLM.from_config(replace(palm.config, finetune_scopes={})).to(device=palm.device, dtype=dtype).requires_grad_(False).eval()
        self.model.tokenizer = palm.tokenizer
        self.weights = dict(self.model.named_parameters())
        self.memory_bytes = sum(w.numel() * w.element_size() for w in self.weights.values())
        self.refresh_seconds, self.version = 0.0, None

    @torch.no_grad()
    def refresh(self, version=None):
        """Copies the learner's base with the current adapters folded in (in fp32, then cast), and
        remembers `version`, the learner's update count it reflects."""
        began = time.perf_counter()
        for name, weight in self.palm.merged_weights(self.scope).items():
            self.weights[name].copy_(weight)
        self.refresh_seconds, self.version = time.perf_counter() - began, version


def log_ratio_to_sampler(log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho = log pi_old - log pi_sampler per response token, 0 where mask is False: (b, r)."""
    return (log_probs - sampler_log_probs).masked_fill(~mask, 0.0)


def importance_weights(log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, mask: torch.Tensor,
                       correction: str, cap: float) -> torch.Tensor | None:
    """Step 3: the weight of each response token's loss (b, r), or None for correction "none".
    log_probs: the learner's (pi_old), sampler_log_probs: the sampler's, both (b, r); mask (b, r)."""
    if correction == "none":
        return None
    log_rho = log_ratio_to_sampler(log_probs, sampler_log_probs, mask)
    if correction.startswith("sequence"):
        log_rho = log_rho.sum(dim=1, keepdim=True).expand_as(log_rho)
    rho = log_rho.clamp(max=80.0).exp()  # exp(80) is finite in fp32; past it the weight is capped or 0 anyway
    if correction.endswith("tis"):
        weights = rho.clamp(max=cap)
    elif correction.endswith("mis"):
        weights = rho * (rho <= cap)
    else:
        raise ValueError(f"unknown rollout_correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    return (weights * mask).detach()


def mismatch_stats(log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, mask: torch.Tensor, cap: float) -> dict:
    """Step 2, token means over the response tokens: sampler_abs_log_ratio (mean |log rho|),
    sampler_kl (k3 estimate of KL(pi_sampler || pi_old) from the sampler's tokens: rho - 1 - log rho)
    and sampler_past_cap (share of tokens with rho > cap)."""
    log_rho = log_ratio_to_sampler(log_probs, sampler_log_probs, mask)
    rho, count = log_rho.exp(), mask.sum().clamp(min=1)
    return dict(sampler_abs_log_ratio=log_rho.abs().sum() / count,
                sampler_kl=((rho - 1 - log_rho) * mask).sum() / count,
                sampler_past_cap=((rho > cap) & mask).sum() / count)
