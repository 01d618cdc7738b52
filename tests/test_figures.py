"""benchmarks/figures.py: the README's figures read back from run folders, the bar, the drift check;
and (slow) the README's first command run again and checked against docs/figures.json."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import figures  # noqa: E402

COLUMNS = "name,method,vader,vader_se,kl,bits_per_byte,command"


def write_runs(runs: Path, rows: list[str]) -> None:
    (runs / "lm").mkdir(parents=True)
    (runs / "lm" / "metrics.csv").write_text("step,name,value\n50,val_bpb,2.7\n650,val_bpb,1.95\n")
    (runs / "reward").mkdir()
    (runs / "reward" / "final_metrics.json").write_text(json.dumps({"test_pairwise_acc": 0.77}))
    (runs / "eval").mkdir()
    (runs / "eval" / "frontier.csv").write_text("\n".join([COLUMNS, "LM,LM,0.10,0.01,0.0,1.70,", *rows]) + "\n")


def test_figures_are_read_from_the_run_folders_and_the_bar_counts_seeds(tmp_path):
    write_runs(tmp_path, ["ppo@s0,ppo,0.45,0.01,7.0,1.60,python train_ppo.py",  # +0.35 at 7 nats: clears
                          'ppo@s1,ppo,0.35,0.01,6.0,1.60,"train_ppo.py --reward_checkpoint a,b"',  # +0.25: short of the gain
                          "ppo@s2,ppo,0.50,0.01,12.0,1.60,",                    # past 10 nats
                          "ppo@s3,ppo,0.50,0.01,8.0,2.20,"])                    # bits per byte 1.29x the LM's
    measured = figures.measured(tmp_path)
    assert measured["lm_val_bpb"] == 1.95 and measured["reward_pairwise_accuracy"] == 0.77
    assert measured["ppo@s0"]["gain"] == pytest.approx(0.35)
    assert [figures.clears_the_bar(measured[f"ppo@s{s}"]) for s in range(4)] == [True, False, False, False]
    assert "1 of 4 seeds clear the bar" in figures.summary(measured)


def test_check_names_each_figure_off_by_more_than_its_tolerance(tmp_path):
    write_runs(tmp_path, ["ppo@s0,ppo,0.45,0.01,7.0,1.60,"])
    measured = figures.measured(tmp_path)
    expected = {"lm_val_bpb": [1.951, 0.01], "reward_pairwise_accuracy": [0.80, 0.01], "ppo@s0/kl": [7.5, 1.0]}
    assert figures.check(measured, expected) == [("reward_pairwise_accuracy", 0.77, 0.80)]


def test_the_readme_figures_file_names_only_figures_that_are_measured(tmp_path):
    expected = json.loads((ROOT / "docs" / "figures.json").read_text())
    write_runs(tmp_path, [f"{m}@s{s},{m},0.45,0.01,7.0,1.60," for m in ("ppo", "rloo") for s in range(5)])
    measured = figures.measured(tmp_path)
    assert figures.check(measured, {name: [0.0, float("inf")] for name in expected}) == []


@pytest.mark.slow
def test_the_first_command_reproduces_the_readme_figures(tmp_path):
    # about 40 minutes on 2 cores: train_lm.py, train_reward.py, train_ppo.py, evaluate.py
    out = subprocess.run([sys.executable, "benchmarks/figures.py", "--only", "first_command", "--check",
                          "--runs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
