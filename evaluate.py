"""One evaluation for every method: the sentiment-vs-KL frontier on held-out prompts.

    python evaluate.py                                            # the LM and best-of-N only
    python evaluate.py --policies ppo=runs/ppo/final,grpo=runs/grpo/final,dpo@0.1=runs/dpo/final

Every policy answers the same `--num_prompts` held-out prompts (the last ones of the `prompts` split:
distinct, and none an opening of a snippet any model trained on; the RL scripts keep them out of
training) with `--samples` responses each, sampled at temperature `--temperature`, each response at
most the RL scripts' budget of new tokens (`--max_seq_len` less the longest training prompt). Every
set of samples (the LM's, the best-of-N pool, each policy's) draws its own random numbers, from a
seed made of `--seed` and the set's name: with one seed, the sampler's exponential race would feed
policy sample j the noise of LM sample j and tie the two. For each policy, with standard errors
clustered by prompt:

- VADER: the mean VADER compound of the responses, a judge no model here was trained on, and the
  win rate against the LM's responses to the same prompts (sample j against the LM's independent
  sample j; ties count half);
- RM: the reward model's score (it was trained on human ratings, and RL optimises it);
- KL(policy || LM) per response at the sampling temperature (the policies are softmax(logits / T)),
  estimated on the policy's own samples: sum_t log pi - log pi_LM. For best-of-N, the plug-in
  estimate from each prompt's pool of picker scores, sum over score levels of P_N log(P_N / P) with
  P_N = F^N - F_<^N (Beirami et al. 2024), beside the bound log N - (N - 1) / N (Stiennon et al.
  2020, appendix G.3) that it reaches only when no two samples score alike (VADER scores many at 0);
- gold: with --gold_checkpoint, the gold reward model's score (Gao et al. 2022), the stand-in for the
  people who answer in train_rounds.py, which no policy optimised directly;
- fragment share: the share of responses holding a word that no human snippet holds and that recurs
  in at least 0.5 % of the set's responses (palm_rlhf/rounds.py), the mark of a learned quirk;
- fluency: the LM's bits per byte on the responses at the sampling temperature; diversity:
  distinct-2 (unique word bigrams over all bigrams) of one response per prompt, averaged over the
  draws, so that every row counts it over the same number of texts; the share of responses that
  end with EOS; the mean length in bytes of text.

Best-of-N is computed from `max(best_of)` LM samples per prompt, cut into disjoint groups of N, each
group giving one pick: picked by the reward model (what RL can reach by optimising it) and by VADER
itself (what the LM's samples hold: the ceiling for a perfect reward model). A name `method@label`
(e.g. `dpo@0.1`) puts several policies on one curve; the command that trained a policy (its
folder's run.json) goes into the CSV beside its row. Writes out_dir/frontier.csv and frontier.png.
"""
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from palm_rlhf import PaLM
from palm_rlhf.config import check_settings, parse_config, setting
from palm_rlhf.data import review_prompts, stable_bucket, vader_compound
from palm_rlhf.dpo import pack_sequences, sequence_log_probs
from palm_rlhf.reward import RewardModel
from palm_rlhf.rounds import holds_fragment, human_vocabulary
from palm_rlhf.training import load_lm, set_seed

METRICS = ("vader", "win_rate", "rm_score", "gold", "fragment_share", "kl", "kl_bound", "bits_per_byte", "distinct_2", "eos_rate", "length")


@dataclass
class EvaluateConfig:
    """Measure policies and best-of-N on held-out prompts: VADER, win rate, RM score, KL to the LM, fluency, diversity."""

    policies: str = setting("", "comma-separated name=checkpoint (PaLM.from_pretrained folders); name method@label groups a curve")
    lm_checkpoint: str = setting("runs/lm/final", "the LM: reference of the KL, fluency and win rate")
    reward_checkpoint: str = setting("runs/reward/final", "the reward model that scores responses and picks best-of-N")
    gold_checkpoint: str = setting("", "a gold reward model (Gao et al. 2022; see palm_rlhf/crowd.py) scored beside VADER; empty: none")
    num_prompts: int = setting(256, "held-out prompts: the last ones of the prompts split", at_least=2)
    samples: int = setting(4, "responses per prompt and policy", at_least=1)
    best_of: str = setting("1,2,4,8,16,32,64", "N of best-of-N from the LM's samples (empty: none)")
    prompt_words: int = setting(4, "words of each held-out snippet used as its prompt", at_least=1)
    max_seq_len: int = setting(48, "as the RL scripts': each response gets at most max_seq_len - the longest training prompt tokens (about 160 for a byte-level LM)", at_least=2)
    temperature: float = setting(1.0, "sampling temperature of every policy", above=0)
    batch_size: int = setting(256, "sequences per generation or scoring batch", at_least=1)
    out_dir: str = setting("runs/eval", "where frontier.csv and frontier.png go")
    seed: int = setting(0, "seed of the sampling; each set of samples draws from (seed, its name)")

    def __post_init__(self):
        check_settings(self)


# ---------------------------------------------------------------------------------------------------
# the statistics


def mean_and_se(per_prompt: np.ndarray) -> tuple:
    """(P, k) values, k responses of each of P prompts -> (mean, standard error over prompts). Responses
    to one prompt are not independent, so the prompt is the unit of the standard error."""
    prompt_means = per_prompt.reshape(per_prompt.shape[0], -1).mean(axis=1)
    se = prompt_means.std(ddof=1) / math.sqrt(len(prompt_means)) if len(prompt_means) > 1 else float("nan")
    return float(prompt_means.mean()), float(se)


def win_rate(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """1 where a response beats the baseline response it is paired with, 0.5 on a tie, else 0."""
    return (scores > baseline) + 0.5 * (scores == baseline)


def best_of_n_kl(n: int) -> float:
    """The analytic bound on KL(best-of-N || base), log N - (N - 1) / N (Stiennon et al. 2020, G.3;
    Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy"): exact for a
    picker that never scores two responses alike, above the truth when it does."""
    return math.log(n) - (n - 1) / n


def best_of_n_kl_plugin(scores: np.ndarray, n: int) -> np.ndarray:
    """scores (P, K): the picker's scores of K base samples per prompt -> (P,) plug-in estimates of
    KL(best-of-N || base), one per prompt. Best-of-N picks a score level with probability
    P_N(s) = F(s)^N - F_<(s)^N (F the empirical distribution function of the K scores, F_< its value
    just below s) and, within a level, every response alike, so its KL is that of the levels:

        KL = sum_s P_N(s) log(P_N(s) / P(s)),    P(s) the share of the K samples scoring s
    """
    kls = np.empty(len(scores))
    for i, row in enumerate(scores):
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        below = np.concatenate(([0.0], np.cumsum(p)[:-1]))
        p_n = np.minimum(below + p, 1.0) ** n - below**n
        kept = p_n > 0
        kls[i] = float((p_n[kept] * np.log(p_n[kept] / p[kept])).sum())
    return kls


def distinct_n(texts: list, n: int = 2) -> float:
    """Unique word n-grams over all word n-grams of `texts` (Li et al. 2016); 0 if there are none."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_per_draw(texts: np.ndarray, n: int = 2) -> float:
    """texts (P, k): k responses to each of P prompts -> distinct-n of one response per prompt,
    averaged over the k draws. distinct-n falls with the number of texts it is counted over, so rows
    with other k (a policy's 4 responses, best-of-64's one pick per prompt) are compared on P texts each."""
    return float(np.mean([distinct_n(list(texts[:, j]), n) for j in range(texts.shape[1])]))


def sampling_seed(seed: int, name: str) -> int:
    """The seed of one set of samples: its own stream for each name, the same in every run."""
    return int(np.random.SeedSequence([seed, stable_bucket(name, 2**32)]).generate_state(1)[0])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, tied values sharing the mean of their ranks (as Spearman's rho needs:
    most VADER scores of the LM's samples are tied at 0)."""
    ranks = np.empty(len(x))
    ranks[x.argsort(kind="stable")] = np.arange(len(x))
    _, tie_group, tie_count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / tie_count)[tie_group]


def within_prompt_spearman(a: np.ndarray, b: np.ndarray) -> tuple:
    """a, b (P, K): K responses to each of P prompts. Spearman's rho of a and b among the responses to one
    prompt, averaged over the prompts where neither is constant -> (mean, standard error). This is what
    best-of-N and group-relative RL see of a reward: how it orders responses to the same prompt."""
    rhos = [np.corrcoef(average_ranks(x), average_ranks(y))[0, 1] for x, y in zip(a, b) if x.std() > 0 and y.std() > 0]
    return mean_and_se(np.array(rhos)[:, None]) if rhos else (float("nan"), float("nan"))


def best_of_n_index(scores: np.ndarray, n: int) -> np.ndarray:
    """scores (P, K) of K samples per prompt -> (P, K // n) indices of the best of each disjoint group of n."""
    groups = scores[:, : scores.shape[1] // n * n].reshape(scores.shape[0], -1, n)
    return groups.argmax(axis=2) + np.arange(groups.shape[1])[None, :] * n


# ---------------------------------------------------------------------------------------------------
# sampling and scoring


@torch.no_grad()
def sample_responses(palm: PaLM, heads: list, num_samples: int, budget: int, cfg, seed: int) -> list:
    """`num_samples` responses of at most `budget` tokens to each prompt (token lists, EOS kept where
    reached), prompt-major: responses[i * num_samples + j] is sample j of prompt i."""
    generator = torch.Generator(palm.device).manual_seed(seed)
    repeated = [torch.tensor(h) for h in heads for _ in range(num_samples)]
    responses, eos = [], palm.tokenizer.eos_id
    for start in tqdm(range(0, len(repeated), cfg.batch_size), desc="sampling", leave=False):
        batch = repeated[start : start + cfg.batch_size]
        tokens = palm.generate(max(len(p) for p in batch) + budget, prompt=batch, temperature=cfg.temperature,
                               eos_token=eos, generator=generator)
        for row in tokens.tolist():
            responses.append(row[: row.index(eos) + 1] if eos in row else row)
    return responses


@torch.no_grad()
def response_log_probs(palm: PaLM, heads: list, tails: list, cfg) -> np.ndarray:
    """Summed log-prob of each tail given its head under `palm` at the sampling temperature, the
    policy softmax(logits / T) that sampled it: (len(tails),)."""
    out = []
    for start in range(0, len(tails), cfg.batch_size):
        seq, mask, response_mask = (t.to(palm.device) for t in pack_sequences(heads[start : start + cfg.batch_size], tails[start : start + cfg.batch_size], palm.pad_id))
        out.append(sequence_log_probs(palm, seq, mask, response_mask, temperature=cfg.temperature).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def reward_scores(reward_model: RewardModel, heads: list, tails: list, batch_size: int) -> np.ndarray:
    """The reward model's score of each (prompt, response), as RL computes it: (len(tails),)."""
    out = []
    for start in range(0, len(tails), batch_size):
        h, t = heads[start : start + batch_size], tails[start : start + batch_size]
        seq, mask, response_mask = (x.to(reward_model.palm.device) for x in pack_sequences(h, t, reward_model.palm.pad_id))
        out.append(reward_model.score(seq, prompt_mask=mask & ~response_mask, mask=mask).float().cpu())
    return torch.cat(out).numpy()


def response_texts(tails: list, tokenizer) -> list:
    return [tokenizer.decode(t) for t in tails]


# ---------------------------------------------------------------------------------------------------
# one row per policy


def summarize(name: str, per_response: dict) -> dict:
    """Mean and standard error over prompts of each metric, each a (P, k) array."""
    row = dict(name=name)
    for key in METRICS:
        if key in per_response:
            row[key], row[f"{key}_se"] = mean_and_se(per_response[key])
    return row


def measure(heads: list, tails: list, num_samples: int, lm: PaLM, reward_model: RewardModel, cfg,
            baseline_vader: np.ndarray | None = None, policy: PaLM | None = None, gold: RewardModel | None = None) -> dict:
    """Per-response metrics (P, k) of `tails` (prompt-major, k per prompt); the win rate needs the
    baseline's VADER (P, k), the KL the policy that sampled `tails`."""
    shape = (len(heads), num_samples)
    repeated_heads = [h for h in heads for _ in range(num_samples)]
    texts = response_texts(tails, lm.tokenizer)
    lm_log_probs = response_log_probs(lm, repeated_heads, tails, cfg)
    ended = np.array([float(bool(t) and t[-1] == lm.tokenizer.eos_id) for t in tails])
    text_bytes = np.array([len(text.encode("utf-8")) for text in texts], dtype=np.float64)
    num_bytes = np.maximum(1, text_bytes + ended)  # the EOS counts as a byte, as in the byte vocabulary
    per_response = dict(
        vader=np.array(vader_compound(texts)).reshape(shape),
        rm_score=reward_scores(reward_model, repeated_heads, tails, cfg.batch_size).reshape(shape),
        bits_per_byte=(-lm_log_probs / num_bytes / math.log(2)).reshape(shape),
        eos_rate=ended.reshape(shape),
        length=text_bytes.reshape(shape),
        fragment_share=holds_fragment(texts, vocabulary()).reshape(shape),
    )
    if gold is not None:
        per_response["gold"] = reward_scores(gold, repeated_heads, tails, cfg.batch_size).reshape(shape)
    if baseline_vader is not None:
        per_response["win_rate"] = win_rate(per_response["vader"], baseline_vader)
    if policy is not None:
        per_response["kl"] = (response_log_probs(policy, repeated_heads, tails, cfg) - lm_log_probs).reshape(shape)
    per_response["distinct_2"] = np.full(shape, distinct_n_per_draw(np.array(texts, dtype=object).reshape(shape)))
    return per_response


@lru_cache(maxsize=1)
def vocabulary() -> frozenset:
    return frozenset(human_vocabulary())


def best_of_n_rows(pool_tails: list, per_response: dict, best_of: list, lm_vader: np.ndarray, tokenizer) -> list:
    """Rows for best-of-N picked by the reward model and by VADER from a pool of the LM's samples
    (P, K); each pick's win rate is against the independent LM responses `lm_vader` (P, k), its KL
    the plug-in estimate from the pool (with the bound beside it)."""
    rows = []
    texts = np.array(response_texts(pool_tails, tokenizer), dtype=object).reshape(per_response["vader"].shape)
    for picker in ("rm_score", "vader"):
        for n in best_of:
            index = best_of_n_index(per_response[picker], n)  # (P, K // n)
            picked = {key: np.take_along_axis(value, index, axis=1) for key, value in per_response.items()
                      if key not in ("distinct_2", "fragment_share")}
            baseline = lm_vader[:, np.arange(index.shape[1]) % lm_vader.shape[1]]  # pick g against LM response g mod k
            picked["win_rate"] = win_rate(picked["vader"], baseline)
            picked_texts = np.take_along_axis(texts, index, axis=1)
            picked["distinct_2"] = np.full(index.shape, distinct_n_per_draw(picked_texts))
            # the picks' own fragments: a quirk that best-of-N concentrates is rare in the whole pool
            picked["fragment_share"] = holds_fragment(list(picked_texts.ravel()), vocabulary()).reshape(index.shape)
            picked["kl"] = best_of_n_kl_plugin(per_response[picker], n)[:, None]
            picked["kl_bound"] = np.full((len(index), 1), best_of_n_kl(n))
            label = "rm" if picker == "rm_score" else "vader"
            rows.append(dict(summarize(f"best-of-{n} ({label})", picked), method=f"best-of-N ({label})", n=n))
    return rows


# ---------------------------------------------------------------------------------------------------
# output


def write_csv(rows: list, path: Path) -> None:
    columns = ["name", "method"] + [c for key in METRICS for c in (key, f"{key}_se")] + ["command"]
    with open(path, "w") as file:
        file.write(",".join(columns) + "\n")
        for row in rows:
            file.write(",".join(csv_cell(row.get(c, "")) for c in columns) + "\n")


def csv_cell(value) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def print_table(rows: list) -> None:
    with_gold = all("gold" in r for r in rows)
    gold_head, gold_rule = (f" {'gold score':>15} |", "-" * 17 + "|") if with_gold else ("", "")
    print(f"\n| {'policy':22} | {'VADER':>15} | {'win vs LM':>13} | {'RM score':>15} |{gold_head} {'fragment':>8} | {'KL nats':>12} | {'KL bound':>8} | {'bits/byte':>9} | {'distinct-2':>10} | {'EOS':>5} | {'length':>6} |")
    print("|" + "|".join("-" * w for w in (24, 17, 15, 17)) + "|" + gold_rule + "|".join("-" * w for w in (10, 14, 10, 11, 12, 7, 8)) + "|")
    for r in rows:
        bound = f"{r['kl_bound']:8.2f}" if "kl_bound" in r else " " * 8
        gold = f" {r['gold']:+.3f} +- {r['gold_se']:.3f} |" if with_gold else ""
        print(f"| {r['name']:22} | {r['vader']:+.3f} +- {r['vader_se']:.3f} | {r['win_rate']:.3f} +- {r['win_rate_se']:.3f} "
              f"| {r['rm_score']:+.3f} +- {r['rm_score_se']:.3f} |{gold} {100 * r['fragment_share']:7.2f}% | {r['kl']:6.2f} +- {r['kl_se']:.2f} "
              f"| {bound} | {r['bits_per_byte']:9.3f} | {r['distinct_2']:10.3f} | {r['eos_rate']:5.2f} | {r['length']:6.1f} |")


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("vader", "VADER compound (the judge)"), ("rm_score", "reward-model score (--reward_checkpoint's)")]
    panels += [("gold", "gold reward model (the simulated people)")] if all("gold" in r for r in rows) else []
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for axis, (key, title) in zip(axes, panels):
        for method in methods:
            points = sorted((r["kl"], r[key], r[f"{key}_se"], r["name"]) for r in rows if r["method"] == method)
            kls, values, errors, names = zip(*points)
            axis.errorbar(kls, values, yerr=errors, marker="o", capsize=3, label=method)
        axis.set_xlabel("KL(policy || LM), nats per response")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_policies(text: str) -> list:
    """'a=path,b@0.1=path' -> [(name, method, path)]."""
    policies = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--policies: {item!r} is not name=checkpoint")
        policies.append((name, name.split("@")[0], path))
    return policies


def training_command(path) -> str:
    """The command that trained the policy in `path`, from the run.json its script wrote ("" if none)."""
    record = Path(path) / "run.json"
    return json.loads(record.read_text()).get("command", "") if record.is_file() else ""


def evaluate(cfg: EvaluateConfig) -> list:
    policies = parse_policies(cfg.policies)
    best_of = sorted({int(n) for n in cfg.best_of.split(",") if n.strip()})
    checkpoints = [("lm_checkpoint", cfg.lm_checkpoint), ("reward_checkpoint", cfg.reward_checkpoint)]
    checkpoints += [("gold_checkpoint", cfg.gold_checkpoint)] if cfg.gold_checkpoint else []
    for name, path in checkpoints + [(n, p) for n, _, p in policies]:
        if not Path(path).is_dir():
            raise SystemExit(f"{name}: no checkpoint folder at {path}")
    if any(n < 1 for n in best_of):
        raise SystemExit(f"--best_of {cfg.best_of}: every N must be >= 1")
    texts = review_prompts(cfg.prompt_words)
    if cfg.num_prompts >= len(texts) or cfg.samples < 1:
        raise SystemExit(f"--num_prompts must be less than {len(texts)} and --samples at least 1")
    set_seed(cfg.seed)
    lm = load_lm(cfg.lm_checkpoint).eval()
    tokenizer = lm.tokenizer
    heads = [tokenizer.encode_prompt(t).tolist() for t in texts]
    # the RL scripts' budget: max_seq_len less the longest of the prompts they train on
    budget = cfg.max_seq_len - max(len(h) for h in heads[: -cfg.num_prompts])
    if budget < 1:
        raise SystemExit(f"--max_seq_len {cfg.max_seq_len} leaves no room for a response after the longest training prompt")
    heads = heads[-cfg.num_prompts :]
    reward_model = RewardModel.from_pretrained(cfg.reward_checkpoint).eval()
    gold = RewardModel.from_pretrained(cfg.gold_checkpoint).eval() if cfg.gold_checkpoint else None

    def sample(palm, name, num_samples):
        return sample_responses(palm, heads, num_samples, budget, cfg, sampling_seed(cfg.seed, name))

    # the LM's responses, the baseline of every win rate, and a pool for best-of-N (and for the LM's
    # own win rate, 0.5 up to noise), each with its own noise
    lm_tails = sample(lm, "LM", cfg.samples)
    pool_k = max([2 * cfg.samples, *best_of])
    pool_tails = sample(lm, "best-of-N pool", pool_k)
    pool = measure(heads, pool_tails, pool_k, lm, reward_model, cfg, gold=gold)
    lm_metrics = measure(heads, lm_tails, cfg.samples, lm, reward_model, cfg, baseline_vader=pool["vader"][:, : cfg.samples], gold=gold)
    lm_metrics["kl"] = np.zeros_like(lm_metrics["vader"])
    lm_vader = lm_metrics["vader"]
    rows = [dict(summarize("LM", lm_metrics), method="LM", command=training_command(cfg.lm_checkpoint))]
    rows += best_of_n_rows(pool_tails, pool, best_of, lm_vader, tokenizer)
    for name, method, path in policies:
        policy = PaLM.from_pretrained(path).eval()
        tails = sample(policy, name, cfg.samples)
        per_response = measure(heads, tails, cfg.samples, lm, reward_model, cfg, baseline_vader=lm_vader, policy=policy, gold=gold)
        rows.append(dict(summarize(name, per_response), method=method, command=training_command(path)))
        print(f"{name}: VADER {rows[-1]['vader']:+.3f}, KL {rows[-1]['kl']:.2f}; e.g. {texts[-cfg.num_prompts] + response_texts(tails[:1], tokenizer)[0]!r}")

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "frontier.csv")
    plot(rows, out_dir / "frontier.png")
    print(f"\n{len(heads)} held-out prompts; {cfg.samples} responses each per policy, at most {budget} tokens; best-of-N from "
          f"{pool_k} LM samples per prompt; +- one standard error clustered by prompt; KL at temperature {cfg.temperature}")
    print_table(rows)
    rho, rho_se = within_prompt_spearman(pool["rm_score"], pool["vader"])
    print(f"\nthe reward model orders the LM's {pool_k} samples of a prompt as VADER does with Spearman rho "
          f"{rho:+.3f} +- {rho_se:.3f} (1: the same order; 0: unrelated)")
    print(f"\n{out_dir / 'frontier.csv'}, {out_dir / 'frontier.png'}")
    return rows


if __name__ == "__main__":
    evaluate(parse_config(EvaluateConfig, sys.argv[1:]))
