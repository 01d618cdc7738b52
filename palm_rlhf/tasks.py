"""A verifiable task for RL: problems generated in code, answers checked exactly.

The task is addition of two `digits`-digit numbers, written as a byte string: the prompt "37+48="
and the answer "85". It suits a byte-level model of our size: one line, a few tokens to sample, a
skill that grows with training (carries are the hard part), and an answer that is right or wrong.

- Splits: a problem is held out when a stable hash of its unordered pair of operands falls in the
  held-out buckets, so 37+48 and 48+37 always share a split and no held-out problem, nor its
  commuted twin, can appear in the fine-tuning or RL data.
- Format: the sequence is [EOS] prompt answer [EOS]; the leading EOS is the begin-of-document token
  that text prompts get everywhere else in the library (the tokenizers' encode_prompt).
- Scorer: `score_answer` is 1 when the response, stripped of surrounding whitespace, is the answer.
- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
  Code", eq. 1) from n samples per problem of which c are correct, averaged over problems.
"""
import math
import random
from typing import NamedTuple

import torch

from palm_rlhf.data import stable_bucket
from palm_rlhf.model import PaLM
from palm_rlhf.tokenizer import ByteTokenizer, pad

HELDOUT_BUCKETS = 10  # of 100: 10 % of the problems are held out


class Problem(NamedTuple):
    prompt: str  # "37+48="
    answer: str  # "85"


def addition(a: int, b: int) -> Problem:
    return Problem(f"{a}+{b}=", str(a + b))


def is_heldout(a: int, b: int) -> bool:
    """Whether a + b belongs to the held-out split; a + b and b + a always agree."""
    low, high = sorted((a, b))
    return stable_bucket(f"{low}+{high}", 100) < HELDOUT_BUCKETS


def addition_problems(split: str, count: int, digits: int = 3, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of the `split` ("train" or "heldout"), operands uniform in
    [0, 10**digits), drawn by a generator seeded with `seed`: the same list in every run."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    heldout = split == "heldout"
    split_size = 10 ** (2 * digits) * (HELDOUT_BUCKETS if heldout else 100 - HELDOUT_BUCKETS) / 100
    if count > split_size / 2:  # rejection sampling slows down as the split runs out
        raise ValueError(f"{count} problems is too many for {digits}-digit operands; use more digits")
    rng, problems = random.Random(f"{split}-{digits}-{seed}"), {}
    while len(problems) < count:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if is_heldout(a, b) == heldout:
            problems.setdefault((a, b), addition(a, b))
    return list(problems.values())


def score_answer(response: str, problem: Problem) -> int:
    """The exact scorer: 1 if the response is the answer (surrounding whitespace ignored), else 0."""
    return int(response.strip() == problem.answer)


# ---------------------------------------------------------------------------------------------------
# tokens for supervised fine-tuning and the reward for RL


def encode_examples(problems: list[Problem], tokenizer=None):
    """Right-padded SFT sequences [EOS] prompt answer [EOS] -> seq (b, n) and answer_mask (b, n),
    True at the answer's tokens and its closing EOS: the tokens the fine-tuning loss learns."""
    tokenizer = tokenizer or ByteTokenizer()
    prompts = [tokenizer.encode_prompt(p.prompt) for p in problems]
    answers = [tokenizer.encode(p.answer, add_eos=True) for p in problems]
    seq, _ = pad([torch.cat((prompt, answer)) for prompt, answer in zip(prompts, answers)], tokenizer.pad_id)
    answer_mask, _ = pad([[0] * len(prompt) + [1] * len(answer) for prompt, answer in zip(prompts, answers)], 0)
    return seq, answer_mask.bool()


def answer_loss(palm: PaLM, seq: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given everything before them. Right padding needs
    no attention mask: causal attention never lets a token see the padding after it."""
    targets = seq[:, 1:].masked_fill(~answer_mask[:, 1:], palm.pad_id)
    logits = palm(seq[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=palm.pad_id)


def verifiable_reward_fn(problems: list[Problem], tokenizer=None):
    """A reward_fn(seq, prompt_mask=, mask=) -> (b,) for the RL trainers: score_answer of each
    response against the problem its prompt poses (looked up by the prompt's text)."""
    tokenizer = tokenizer or ByteTokenizer()
    by_prompt = {p.prompt: p for p in problems}

    def reward_fn(seq, prompt_mask, mask):
        scores = []
        for s, p, m in zip(seq.cpu(), prompt_mask.cpu(), mask.cpu()):
            prompt = tokenizer.decode([t for t in s[p].tolist() if t != tokenizer.eos_id])  # the begin-of-document EOS dropped
            if prompt not in by_prompt:
                raise KeyError(f"prompt {prompt!r} is not one of the task's problems")
            scores.append(score_answer(tokenizer.decode(s[m & ~p]), by_prompt[prompt]))
        return torch.tensor(scores, dtype=torch.float, device=seq.device)

    return reward_fn


# ---------------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021, eq. 1, for one problem: the probability that k samples drawn without
    replacement from n, of which c are correct, include a correct one: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: list[int], n: int, k: int) -> tuple[float, float]:
    """pass@k averaged over problems (correct[i] of n samples right on problem i), and its
    standard error over problems (sample std / sqrt(number of problems))."""
    values = torch.tensor([pass_at_k(n, c, k) for c in correct], dtype=torch.float64)
    stderr = values.std() / math.sqrt(len(values)) if len(values) > 1 else torch.tensor(0.0)
    return values.mean().item(), stderr.item()


@torch.no_grad()
def count_correct(palm: PaLM, problems: list[Problem], num_samples: int, temperature: float = 1.0,
                  max_new_tokens: int = 8, seed: int = 0, batch_size: int = 512, tokenizer=None,
                  finetune_scope: str | None = None) -> list[int]:
    """Samples `num_samples` responses to each problem (seeded; temperature 0 is greedy), about
    `batch_size` at a time, each prompt encoded once for its samples; returns how many are correct,
    per problem."""
    tokenizer = tokenizer or ByteTokenizer()
    generator = torch.Generator(palm.device).manual_seed(seed)
    per_batch = max(1, batch_size // num_samples)  # problems per batch
    correct = []
    for start in range(0, len(problems), per_batch):
        batch = problems[start : start + per_batch]
        prompt, prompt_mask = pad([tokenizer.encode_prompt(p.prompt) for p in batch], palm.pad_id, side="left")
        tokens = palm.generate(prompt.shape[1] + max_new_tokens, prompt=prompt.to(palm.device),
                               prompt_mask=prompt_mask.to(palm.device), temperature=temperature,
                               eos_token=tokenizer.eos_id, generator=generator, finetune_scope=finetune_scope,
                               num_samples_per_prompt=num_samples)
        responses = tokens.cpu().view(len(batch), num_samples, -1)  # (problems, samples, new tokens)
        correct += [sum(score_answer(tokenizer.decode(r), p) for r in rows) for p, rows in zip(batch, responses)]
    return correct
