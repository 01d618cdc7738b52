"""Reproduces the README's results: the first command's stages, the default RL stages over seeds, and
their frontier, then compares what it measured with the figures the README prints (docs/figures.json).

    python benchmarks/figures.py                      # all of it, into runs/ (about 105 minutes on 2 cores)
    python benchmarks/figures.py --only first_command --check   # train_lm, train_reward, train_ppo; fail on drift
    python benchmarks/figures.py --runs runs --report # the tables from runs already there

A stage whose final folder exists is not run again. The first command's figures are deterministic on
one machine and thread count, not across them (a different reduction order flips a sampled token,
and RL amplifies it), so --check compares to a tolerance and the seeds' spread is the figure to quote.
"""
import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from palm_rlhf.config import parse_config, setting  # noqa: E402
from palm_rlhf.training import read_metrics  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
BAR = dict(vader_gain=0.30, kl=10.0, bits_per_byte_ratio=1.25)  # the RL stage's bar (README, Results)


@dataclass
class FiguresConfig:
    """Run (or read) the README's default pipeline over seeds, print its tables, and check them against docs/figures.json."""

    runs: str = setting("runs", "folder of the run folders (lm, reward, ppo_s0, ..., rloo_s4, eval)")
    only: str = setting("all", "all, or first_command (train_lm, train_reward, train_ppo at seed 0)", choices=("all", "first_command"))
    check: bool = setting(False, "exit 1 when a figure is off docs/figures.json by more than its tolerance")
    report: bool = setting(False, "only print the tables from the runs there, run nothing")


def stages(runs: Path, only: str) -> list:
    """(final folder, command) of every stage, in order."""
    models = ["--lm_checkpoint", str(runs / "lm" / "final"), "--reward_checkpoint", str(runs / "reward" / "final")]
    todo = [(runs / "lm", ["train_lm.py", "--out_dir", str(runs / "lm")]),
            (runs / "reward", ["train_reward.py", "--lm_checkpoint", str(runs / "lm" / "final"), "--out_dir", str(runs / "reward")]),
            (runs / "ppo_s0", ["train_ppo.py", *models, "--seed", "0", "--out_dir", str(runs / "ppo_s0")])]
    if only == "all":
        for seed in SEEDS[1:]:
            todo.append((runs / f"ppo_s{seed}", ["train_ppo.py", *models, "--seed", str(seed), "--out_dir", str(runs / f"ppo_s{seed}")]))
        for seed in SEEDS:
            todo.append((runs / f"rloo_s{seed}", ["train_grpo.py", *models, "--seed", str(seed), "--out_dir", str(runs / f"rloo_s{seed}")]))
    seeds, methods = (SEEDS, ("ppo", "rloo")) if only == "all" else ((0,), ("ppo",))
    policies = ",".join(f"{name}@s{seed}={runs / f'{name}_s{seed}' / 'final'}" for name in methods for seed in seeds)
    todo.append((runs / "eval", ["evaluate.py", *models, "--policies", policies, "--out_dir", str(runs / "eval")]))
    return todo


def run_stage(done_marker: Path, command: list) -> None:
    if (done_marker / "final").is_dir() or (done_marker / "frontier.csv").is_file():
        print(f"have {done_marker}")
        return
    print("running", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def read_frontier(path: Path) -> dict:
    """evaluate.py's frontier.csv as {name: {metric: value}} (its command cells are quoted)."""
    with open(path, newline="") as file:
        return {row["name"]: {k: float(v) for k, v in row.items() if k not in ("name", "method", "command") and v}
                for row in csv.DictReader(file)}


def measured(runs: Path) -> dict:
    """The figures the README quotes, from the run folders."""
    figures = {}
    figures["lm_val_bpb"] = read_metrics(runs / "lm" / "metrics.csv")["val_bpb"][1][-1]
    figures["reward_pairwise_accuracy"] = json.loads((runs / "reward" / "final_metrics.json").read_text())["test_pairwise_acc"]
    frontier = read_frontier(runs / "eval" / "frontier.csv")
    lm = frontier["LM"]
    for name, row in frontier.items():
        if "@s" in name:
            figures[name] = dict(vader=row["vader"], vader_se=row["vader_se"], gain=row["vader"] - lm["vader"], kl=row["kl"],
                                 bits_per_byte_ratio=row["bits_per_byte"] / lm["bits_per_byte"])
    figures["lm_vader"] = lm["vader"]
    return figures


def clears_the_bar(row: dict) -> bool:
    return row["gain"] >= BAR["vader_gain"] and row["kl"] <= BAR["kl"] and row["bits_per_byte_ratio"] <= BAR["bits_per_byte_ratio"]


def summary(figures: dict) -> str:
    lines = [f"LM: validation {figures['lm_val_bpb']:.3f} bits per byte; reward model: held-out pairwise accuracy "
             f"{figures['reward_pairwise_accuracy']:.3f}; LM samples: VADER {figures['lm_vader']:+.3f}"]
    for method in ("ppo", "rloo"):
        rows = [figures[k] for k in sorted(figures) if k.startswith(f"{method}@s")]
        if not rows:
            continue
        gains, kls = [r["gain"] for r in rows], [r["kl"] for r in rows]
        mean = sum(gains) / len(gains)
        spread = math.sqrt(sum((g - mean) ** 2 for g in gains) / max(1, len(gains) - 1))
        lines.append(f"{method}: VADER gain {mean:+.3f} (seed sd {spread:.3f}; {min(gains):+.3f} .. {max(gains):+.3f}), "
                     f"KL {sum(kls) / len(kls):.2f} ({min(kls):.2f} .. {max(kls):.2f}) nats; "
                     f"{sum(clears_the_bar(r) for r in rows)} of {len(rows)} seeds clear the bar")
    return "\n".join(lines)


def check(figures: dict, expected: dict) -> list:
    """The figures off their expected value by more than the tolerance: [(name, measured, expected)]."""
    off = []
    for name, (value, tolerance) in expected.items():
        got = figures
        for part in name.split("/"):
            got = got[part]
        if abs(got - value) > tolerance:
            off.append((name, got, value))
    return off


def main(cfg: FiguresConfig) -> int:
    runs = Path(cfg.runs).resolve()
    if not cfg.report:
        for marker, command in stages(runs, cfg.only):
            run_stage(marker, command)
    figures = measured(runs)
    print(summary(figures))
    if not cfg.check:
        return 0
    expected = json.loads((ROOT / "docs" / "figures.json").read_text())
    if cfg.only == "first_command":
        expected = {k: v for k, v in expected.items() if not k.startswith(("ppo@s", "rloo@s")) or k.startswith("ppo@s0/")}
    off = check(figures, expected)
    for name, got, value in off:
        print(f"drift: {name} {got:.4f}, the README's {value:.4f}")
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main(parse_config(FiguresConfig, sys.argv[1:])))
