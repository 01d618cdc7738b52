import math

import pytest
import torch

from palm_rlhf.grpo import dr_grpo_advantages, grpo_advantages, rloo_advantages

# two prompts x four samples
SCORES = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])


# --- advantage estimators -------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    # prompt 0: mean 3, deviations -2 -1 0 3, sample variance (4 + 1 + 0 + 9) / 3
    # prompt 1: mean 0.5, deviations +-0.5, sample variance 4 * 0.25 / 3
    std0, std1 = math.sqrt(14 / 3), math.sqrt(1 / 3)
    expected = torch.tensor([[-2 / (std0 + 1e-4), -1 / (std0 + 1e-4), 0.0, 3 / (std0 + 1e-4)],
                             [-0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4)]])
    torch.testing.assert_close(grpo_advantages(SCORES), expected)
    torch.testing.assert_close(grpo_advantages(SCORES, eps=0.0)[1], torch.tensor([-1.0, -1.0, 1.0, 1.0]) * math.sqrt(3) / 2)


def test_dr_grpo_advantages_by_hand():
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [-0.5, -0.5, 0.5, 0.5]])
    torch.testing.assert_close(dr_grpo_advantages(SCORES), expected)


def test_rloo_advantages_by_hand():
    # prompt 0: 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], [-2 / 3, -2 / 3, 2 / 3, 2 / 3]])
    torch.testing.assert_close(rloo_advantages(SCORES), expected)


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_equal_scores_give_exactly_zero_advantage(estimator):
    # the float32 mean of eight 0.7s is off by an ulp: without care GRPO would turn that into ~6e-4
    scores = torch.tensor([[0.7] * 8, [0.0] * 8, [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    advantages = estimator(scores)
    assert (advantages[:2] == 0).all()
    assert advantages[2, 1] > 0 and (advantages[2, [0, 2]] < 0).all()


def test_one_sample_per_prompt_gives_zero_advantage_or_a_clear_error():
    scores = torch.tensor([[3.0], [-1.0]])
    assert (grpo_advantages(scores) == 0).all() and (dr_grpo_advantages(scores) == 0).all()
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(scores)
