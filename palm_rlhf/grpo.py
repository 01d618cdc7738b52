"""Critic-free, group-relative RL for RLHF: GRPO, Dr. GRPO and RLOO on one frozen PaLM."""
import torch

# ---------------------------------------------------------------------------------------------------
# group-relative advantages: scores (P, G), P prompts x G samples of each -> advantages (P, G)


def constant_groups(scores: torch.Tensor) -> torch.Tensor:
    """(P, G) scores -> (P,) bool, True where all G scores of a prompt are equal: such a group has
    no signal, and the float mean of equal numbers may miss them by an ulp, so its advantages are
    set to exactly 0."""
    return (scores == scores[:, :1]).all(dim=1)


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervision advantage (Shao et al. 2024, "DeepSeekMath", section 4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)    over the G scores r of one prompt

    std is the sample standard deviation (Bessel-corrected, as TRL); every token of response i gets
    A_i. A group of equal scores, or of one sample (G = 1), gets 0."""
    if scores.shape[1] == 1:
        return torch.zeros_like(scores)
    centred = scores - scores.mean(dim=1, keepdim=True)
    advantages = centred / (scores.std(dim=1, keepdim=True) + eps)
    return advantages.masked_fill(constant_groups(scores)[:, None], 0.0)


def dr_grpo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", section 3): GRPO's without the division by the group std, which up-weights
    prompts whose scores barely vary (too easy or too hard):

        A_i = r_i - mean(r)

    A group of equal scores, or of one sample, gets 0."""
    advantages = scores - scores.mean(dim=1, keepdim=True)
    return advantages.masked_fill(constant_groups(scores)[:, None], 0.0)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for
    Free!"; for RLHF, Ahmadian et al. 2024, "Back to Basics", section 3): each sample's baseline is
    the mean score of the other G - 1 samples of its prompt, so the baseline is independent of it:

        A_i = r_i - 1 / (G - 1) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean(r))

    Needs G >= 2. A group of equal scores gets 0."""
    g = scores.shape[1]
    if g < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt for its leave-one-out baseline, got group_size {g}")
    leave_one_out = (scores.sum(dim=1, keepdim=True) - scores) / (g - 1)
    return (scores - leave_one_out).masked_fill(constant_groups(scores)[:, None], 0.0)


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
