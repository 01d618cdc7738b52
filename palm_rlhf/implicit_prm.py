"""Implicit process reward model: Yuan et al. 2024, "Free Process Rewards without Process Labels"
(the PRM that PRIME, Cui et al. 2025, trains online).

A LoRA scope pi on a PaLM, whose reference pi_ref is the same PaLM with the adapters off. The reward
of each response token is its log-likelihood ratio (their proposition 3.1):

    r_t = beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))

and the outcome reward of a response is their sum, r(y) = beta * log pi(y) / pi_ref(y). The model is
trained on outcome labels l in {0, 1} alone, with their cross-entropy (CE) objective:

    L = -[ l * log sigmoid(r(y)) + (1 - l) * log(1 - sigmoid(r(y))) ]

after which each partial sum of r_t is a process reward: the Q-value of the prefix, learnt without
step labels. PaLM-rlhf-pytorch's version returns the log-likelihood itself as the loss (the sign
inverted) and applies the sigmoid to each token's reward instead of their sum.

Choices:

1. One PaLM: the scope and the frozen base are pi and pi_ref (as the reward model and the PPO actor
   here), not two models; the base is frozen, like RewardModel's.
2. Only response tokens are rewarded: prompt and padding get 0.
3. Dropout is off in both passes, so r_t is exactly 0 before training.
4. `score` is the outcome reward r(y), so the model serves any trainer as a reward model; PPO, seeing
   `token_rewards`, uses the dense r_t instead of one score at the end (ppo.py).

Sequences as the reward model's: seq (b, n), prompt_mask (b, n) True on the prompt, mask (b, n)
True at real tokens.
"""
import torch
import torch.nn.functional as F
from torch import nn

from palm_rlhf.model import PaLM, eval_mode


def implicit_prm_loss(outcome_rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The CE objective: binary cross-entropy of sigmoid(r(y)) against outcome labels. (b,), (b,) -> scalar."""
    return F.binary_cross_entropy_with_logits(outcome_rewards, labels.float())


class ImplicitPRM(nn.Module):
    def __init__(self, palm: PaLM, beta: float = 0.05, lora_r: int = 8, scope: str = "prm",
                 ref_model: nn.Module | None = None):
        """Adds the LoRA scope `scope` to `palm` and freezes its base (the reference)."""
        super().__init__()
        if ref_model is not None:
            raise ValueError("the reference here is the given PaLM with the adapters off; pass no ref_model "
                             "(PaLM-rlhf-pytorch's default, a copy of the model, is the same thing)")
        self.palm, self.beta, self.scope = palm, beta, scope
        palm.add_finetune_params(scope, lora_r=lora_r)
        palm.freeze_base()

    def finetune_parameters(self) -> list:
        return self.palm.finetune_parameters(self.scope)

    def token_rewards(self, seq, prompt_mask=None, mask=None) -> torch.Tensor:
        """r_t of each token seq[:, 1:] given its prefix, 0 at prompt and padding: (b, n - 1)."""
        if mask is None:
            mask = seq != self.palm.pad_id
        rewarded = mask if prompt_mask is None else mask & ~prompt_mask
        with eval_mode(self.palm):
            log_probs = self.palm.log_probs(seq, mask, finetune_scope=self.scope)
            with torch.no_grad():
                ref_log_probs = self.palm.log_probs(seq, mask, disable_lora=True)
        return self.beta * (log_probs - ref_log_probs) * rewarded[:, 1:]

    def score(self, seq, prompt_mask=None, mask=None) -> torch.Tensor:
        """The outcome reward r(y) = sum_t r_t, (b,)."""
        return self.token_rewards(seq, prompt_mask, mask).sum(dim=1)

    def forward(self, seq, labels=None, prompt_mask=None, mask=None):
        """labels (b,) in {0, 1}: the CE loss. Without: the token rewards (b, n - 1)."""
        rewards = self.token_rewards(seq, prompt_mask, mask)
        if labels is None:
            return rewards
        return implicit_prm_loss(rewards.sum(dim=1), labels)
