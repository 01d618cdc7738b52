import itertools
import math

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.tasks import (
    Problem,
    addition,
    addition_problems,
    answer_loss,
    count_correct,
    encode_examples,
    is_heldout,
    mean_pass_at_k,
    pass_at_k,
    score_answer,
    verifiable_reward_fn,
)
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, ByteTokenizer

# --- problems and splits ----------------------------------------------------------------------------


def test_addition_formats_prompt_and_answer():
    assert addition(37, 48) == Problem("37+48=", "85")
    assert addition(0, 7) == Problem("0+7=", "7")


def test_splits_are_disjoint_even_up_to_commutation_and_fixed_by_the_seed():
    train = addition_problems("train", 3000, digits=2, seed=0)
    heldout = addition_problems("heldout", 300, digits=2, seed=0)
    assert len(set(train)) == 3000 and len(set(heldout)) == 300
    pairs = lambda problems: {frozenset(map(int, p.prompt[:-1].split("+"))) for p in problems}  # noqa: E731
    assert not pairs(train) & pairs(heldout)
    assert addition_problems("heldout", 300, digits=2, seed=0) == heldout
    assert addition_problems("heldout", 300, digits=2, seed=1) != heldout
    # every held-out problem's twin is held out too, and about 10 % of all problems are
    assert all(is_heldout(a, b) == is_heldout(b, a) for a in range(100) for b in range(100))
    share = sum(is_heldout(a, b) for a in range(100) for b in range(100)) / 10_000
    assert 0.07 < share < 0.13


def test_bad_split_or_count_gets_a_clear_error():
    with pytest.raises(ValueError, match="split must be"):
        addition_problems("test", 10)
    with pytest.raises(ValueError, match="too many"):
        addition_problems("heldout", 100, digits=1)


# --- the scorer and pass@k --------------------------------------------------------------------------


@pytest.mark.parametrize("response,expected", [("85", 1), (" 85\n", 1), ("85 ", 1), ("085", 0), ("8", 0),
                                               ("851", 0), ("85.0", 0), ("", 0), ("eighty-five", 0)])
def test_score_answer_is_exact(response, expected):
    assert score_answer(response, addition(37, 48)) == expected


def brute_force_pass_at_k(n, c, k):
    """The share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_a_count_over_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == 0.25  # pass@1 is the share correct
    assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_mean_pass_at_k_and_its_standard_error():
    mean, stderr = mean_pass_at_k([1, 3], n=4, k=1)  # per problem 0.25 and 0.75
    assert mean == pytest.approx(0.5)
    assert stderr == pytest.approx(math.sqrt(0.125) / math.sqrt(2))  # sample std of (0.25, 0.75) / sqrt(2)


# --- tokens, reward and sampling ---------------------------------------------------------------------


def test_encode_examples_masks_the_answer_and_its_eos():
    seq, answer_mask = encode_examples([addition(1, 2), addition(37, 48)])
    tokenizer = ByteTokenizer()
    assert seq[0].tolist() == [EOS_ID, *b"1+2=3", EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tokenizer.decode(seq[1][answer_mask[1]]) == "85" and seq[1][answer_mask[1]][-1] == EOS_ID
    assert answer_mask.sum(dim=1).tolist() == [2, 3]


def test_answer_loss_ignores_the_prompt():
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    seq, answer_mask = encode_examples([addition(37, 48)])
    loss = answer_loss(palm, seq, answer_mask)
    log_probs = palm.log_probs(seq)[0]  # (n - 1,): log-prob of token t + 1 given the tokens up to t
    torch.testing.assert_close(loss, -log_probs[answer_mask[0, 1:]].mean())


def test_verifiable_reward_fn_scores_each_response_against_its_own_prompt():
    problems = [addition(37, 48), addition(1, 2)]
    tokenizer = ByteTokenizer()
    rows = [(p.prompt, response) for p in problems for response in ("85", "3")]
    seqs = [torch.cat((torch.tensor([EOS_ID]), tokenizer.encode(prompt), tokenizer.encode(response, add_eos=True)))
            for prompt, response in rows]
    n = max(len(s) for s in seqs)
    seq = torch.full((len(seqs), n), PAD_ID)
    prompt_mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, (s, (prompt, _)) in enumerate(zip(seqs, rows)):
        seq[i, : len(s)], mask[i, : len(s)], prompt_mask[i, : len(prompt) + 1] = s, True, True
    rewards = verifiable_reward_fn(problems)(seq, prompt_mask=prompt_mask, mask=mask)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="not one of the task's problems"):
        verifiable_reward_fn(problems[:1])(seq, prompt_mask=prompt_mask, mask=mask)


class Always85:
    """Stands in for a PaLM whose every sample is "85": counting, batching and decoding are what is tested."""

    device, pad_id = torch.device("cpu"), PAD_ID

    def __init__(self):
        self.batch_sizes = []

    def generate(self, seq_len, prompt, prompt_mask, temperature, eos_token, generator, finetune_scope,
                 num_samples_per_prompt):
        self.batch_sizes.append(len(prompt) * num_samples_per_prompt)
        answer = torch.tensor([*b"85", EOS_ID, PAD_ID])[: seq_len - prompt.shape[1]]
        return answer.expand(len(prompt) * num_samples_per_prompt, -1)


def test_count_correct_counts_right_answers_per_problem_across_batches():
    palm = Always85()
    correct = count_correct(palm, [addition(37, 48), addition(1, 2), addition(40, 45)], num_samples=3, batch_size=7)
    assert correct == [3, 0, 3]
    assert palm.batch_sizes == [6, 3]  # two problems (6 samples) fit in 7, then the last


def test_count_correct_on_a_real_model_is_seeded():
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    problems = [addition(1, 2), addition(3, 4)]
    assert count_correct(palm, problems, num_samples=4, seed=3) == count_correct(palm, problems, num_samples=4, seed=3)
    assert count_correct(palm, problems, num_samples=4) == [0, 0]  # an untrained model knows no sums
