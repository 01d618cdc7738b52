import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.reward import RewardModel

ROOT = Path(__file__).resolve().parents[1]
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


def test_best_of_n_kl_bound():
    assert evaluate.best_of_n_kl(1) == 0
    assert evaluate.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_distinct_2_on_words():
    # bigrams: (a b) (b a) (a b) | (a b): 2 unique of 4
    assert evaluate.distinct_n(["a b a b", "a b", "single"]) == pytest.approx(2 / 4)
    assert evaluate.distinct_n(["one"]) == 0.0


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
    lm.save(root / "lm")
    RewardModel(lm, num_binned_output=5).save(root / "reward")
    other = PaLM.from_pretrained(root / "lm")
    with torch.no_grad():
        other.token_emb.weight.add_(0.3 * torch.randn_like(other.token_emb.weight))
    other.save(root / "other")
    return root


def vowel_share(texts):
    """A stand-in judge that random bytes vary on (VADER scores almost all of them 0)."""
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in texts]


def test_frontier_on_two_tiny_policies(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "vader_compound", vowel_share)
    cfg = evaluate.EvaluateConfig(
        policies=f"same={checkpoints / 'lm'},other={checkpoints / 'other'}", lm_checkpoint=str(checkpoints / "lm"),
        reward_checkpoint=str(checkpoints / "reward"), num_prompts=6, samples=2, best_of="1,2,4", max_seq_len=40,
        out_dir=str(tmp_path), batch_size=16,
    )
    rows = {row["name"]: row for row in evaluate.evaluate(cfg)}
    assert set(rows) == {"LM", "same", "other"} | {f"best-of-{n} ({p})" for n in (1, 2, 4) for p in ("rm", "vader")}
    # the LM evaluated as a policy draws the LM's own responses: KL exactly 0, every comparison a tie
    assert rows["same"]["kl"] == 0 and rows["same"]["win_rate"] == 0.5
    assert rows["same"]["vader"] == rows["LM"]["vader"] and rows["same"]["rm_score"] == rows["LM"]["rm_score"]
    assert rows["other"]["kl"] > 0.1 and rows["other"]["vader"] != rows["LM"]["vader"]
    # picking by VADER can only raise VADER, and picking by the reward model its score
    assert rows["best-of-4 (vader)"]["vader"] > rows["best-of-2 (vader)"]["vader"] > rows["best-of-1 (vader)"]["vader"]
    assert rows["best-of-4 (rm)"]["rm_score"] > rows["best-of-1 (rm)"]["rm_score"]
    assert rows["best-of-4 (vader)"]["win_rate"] > 0.6
    assert rows["best-of-1 (rm)"]["vader"] == rows["best-of-1 (vader)"]["vader"]  # best-of-1 picks nothing
    for row in rows.values():
        assert all(math.isfinite(row[key]) for key in evaluate.METRICS), row
        assert 0 <= row["eos_rate"] <= 1 and 0 < row["length"] <= 40 and row["bits_per_byte"] > 0
    lines = (tmp_path / "frontier.csv").read_text().splitlines()
    assert lines[0].startswith("name,method,vader,vader_se") and len(lines) == 1 + len(rows)
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_script_help_and_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--policies" in out.stdout and "--best_of" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--lm_checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no checkpoint folder" in out.stderr
