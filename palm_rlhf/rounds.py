"""What a round of iterated RLHF asks people, and a sign of a policy exploiting its reward model.

Iterated RLHF (InstructGPT's and Llama 2's rounds; Bai et al. 2022's online RLHF): people compare
the current policy's samples, the reward model is refit on their answers, RL runs again.
`train_rounds.py` runs the rounds; this file holds the two pieces of maths they need.

1. Choosing pairs to ask about (ratings cost people's time). From each prompt's sampled responses,
   every pair (i, j) is a candidate. Each ensemble member m scores the responses (standardised by
   its mean and spread over the pool, since each Bradley-Terry head has its own offset and scale) and so predicts P_m(i > j) = sigmoid(r_mi - r_mj), the
   Bradley-Terry probability its loss was fitted to.
   - "disagreement": the pairs whose P_m spread most across members (their standard deviation):
     query by committee (Seung et al. 1992), as in Christiano et al. 2017's ensemble choice.
   - "margin": the pairs whose mean predicted margin |mean_m (r_mi - r_mj)| is smallest, where the
     reward model is least certain which is better (uncertainty sampling); works with one member.
   - "uniform": pairs drawn at random, the baseline.
   Every chooser takes at most `per_prompt` pairs of one prompt, so the answers spread over prompts,
   and only valid candidates (`valid`: train_rounds.py leaves out pairs of equal texts, which carry
   no preference, and responses cut at the length limit, which RL scores without their EOS).
2. The fragment share: the share of responses that carry a word no human snippet holds and that
   recurs across the policy's responses (in at least `min_share` of them). A misspelling of a small
   LM is rare and never recurs; a quirk that a policy learned because the reward model scores it up
   (a stray "Ole" at the end) recurs. "No human snippet holds" is read from the rated data itself:
   every word, lower-cased and without surrounding punctuation, of the four VADER sets.
"""
import string

import numpy as np

from palm_rlhf.data import RATED_SETS, load_rated_snippets

CHOOSERS = ("disagreement", "margin", "uniform")


def candidate_pairs(num_responses: int) -> np.ndarray:
    """(C, 2): every pair i < j of one prompt's responses."""
    return np.array([(i, j) for i in range(num_responses) for j in range(i + 1, num_responses)])


def standardise(scores: np.ndarray) -> np.ndarray:
    """scores (M, P, S): each member's scores less its mean over the pool, over its standard deviation."""
    flat = scores.reshape(len(scores), -1)
    return (scores - flat.mean(axis=1)[:, None, None]) / np.maximum(flat.std(axis=1), 1e-8)[:, None, None]


def pair_priorities(scores: np.ndarray, chooser: str, rng: np.random.Generator) -> np.ndarray:
    """scores (M, P, S) of M members for S responses to each of P prompts -> (P, C) priorities of the
    candidate pairs, higher asked first."""
    if chooser not in CHOOSERS:
        raise ValueError(f"unknown chooser {chooser!r}; choose one of {', '.join(CHOOSERS)}")
    pairs = candidate_pairs(scores.shape[2])
    standard = standardise(scores)
    margins = standard[:, :, pairs[:, 0]] - standard[:, :, pairs[:, 1]]  # (M, P, C)
    if chooser == "disagreement":
        if len(scores) < 2:
            raise ValueError("the disagreement chooser needs an ensemble of at least two reward models")
        return (1 / (1 + np.exp(-margins))).std(axis=0)
    if chooser == "margin":
        return -np.abs(margins.mean(axis=0))
    return rng.random(margins.shape[1:])


def choose_pairs(scores: np.ndarray, num_pairs: int, chooser: str, per_prompt: int = 1, seed: int = 0,
                 valid: np.ndarray | None = None) -> list:
    """The `num_pairs` candidate pairs to ask about, as (prompt index, i, j), highest priority first,
    at most `per_prompt` of any one prompt and only those `valid` (P, C) allows; ties of priority
    broken at random."""
    rng = np.random.default_rng(seed)
    priorities = pair_priorities(scores, chooser, rng)  # (P, C)
    pairs = candidate_pairs(scores.shape[2])
    valid = np.ones(priorities.shape, dtype=bool) if valid is None else valid
    available = int(np.minimum(valid.sum(axis=1), per_prompt).sum())
    if num_pairs > available:
        raise ValueError(f"{num_pairs} pairs asked for, but {priorities.shape[0]} prompts with at most {per_prompt} "
                         f"valid pair(s) each hold {available}: sample more prompts or raise per_prompt")
    priorities = np.where(valid, priorities, -np.inf)
    tiebreak = rng.random(priorities.shape)
    order = np.lexsort((tiebreak.ravel(), -priorities.ravel()))  # by priority, then at random
    chosen, taken = [], np.zeros(priorities.shape[0], dtype=int)
    for flat in order:
        prompt, candidate = divmod(int(flat), priorities.shape[1])
        if taken[prompt] < per_prompt and valid[prompt, candidate]:
            taken[prompt] += 1
            chosen.append((prompt, *map(int, pairs[candidate])))
            if len(chosen) == num_pairs:
                break
    return chosen


def words(text: str) -> list:
    """Lower-cased words without the punctuation around them."""
    return [w for w in (word.strip(string.punctuation).lower() for word in text.split()) if w]


def human_vocabulary(sets=RATED_SETS) -> set:
    """Every word of every human-rated snippet."""
    return {w for name in sets for snippet in load_rated_snippets(name) for w in words(snippet.text)}


def fragments(responses: list, vocabulary: set, min_share: float = 0.005) -> dict:
    """{word: responses holding it} for the words outside `vocabulary` held by >= min_share of the responses."""
    counts: dict = {}
    for response in responses:
        for w in set(words(response)) - vocabulary:
            counts[w] = counts.get(w, 0) + 1
    least = max(2, min_share * len(responses))  # one response alone is never a recurrence
    return {w: n for w, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= least}


def holds_fragment(responses: list, vocabulary: set, min_share: float = 0.005) -> np.ndarray:
    """1.0 for each response holding a fragment of its set (see `fragments`), else 0.0."""
    found = set(fragments(responses, vocabulary, min_share))
    return np.array([float(bool(found & set(words(r)))) for r in responses])


def fragment_share(responses: list, vocabulary: set, min_share: float = 0.005) -> float:
    """The share of responses holding a fragment."""
    return float(holds_fragment(responses, vocabulary, min_share).mean()) if responses else 0.0
