"""The figures of docs/rounds.md from the run folders: each round's policy beside round 0's, and
how far each lies above or below the frontier that the RL stage traces over seeds.

    python benchmarks/rounds.py --rounds runs/rounds,runs/rounds_uniform --seeds runs/eval_seeds/frontier.csv
    python benchmarks/rounds.py --rounds '' --seeds runs/eval_rounds_seeds/frontier.csv --baseline round0

PPO's final KL moves with the seed (4.4 to 11.8 nats over five seeds on one machine), and VADER moves
with the KL, so one round's policy against one round-0 policy compares KLs as much as reward models.
Over seeds, the default PPO runs lie on a line VADER = a + b KL (`--seeds`: evaluate.py's frontier of
`ppo@sS` policies); a round's distance above that line, at its own KL, is what its reward model bought.
When the --seeds frontier also holds other reward models' policies over seeds (`dis1@sS`: train_ppo.py
--seed S against round 1's reward model), each is summarised over its seeds: mean VADER, gold and KL,
and the mean distance above the baseline's line with its standard error over the seeds.
"""
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm_rlhf.config import parse_config, setting  # noqa: E402


@dataclass
class RoundsFiguresConfig:
    """Print the rounds' figures and their distance from the seeds' frontier."""

    rounds: str = setting("runs/rounds", "train_rounds.py --out_dir folders, comma-separated")
    seeds: str = setting("", "evaluate.py's frontier.csv holding ppo@sS rows (the RL stage over seeds); empty: no frontier")
    baseline: str = setting("ppo", "the name whose seeds' rows (name@sS) trace the frontier")


def read_rows(path) -> list:
    with open(path) as file:
        return list(csv.DictReader(file))


def seeded(rows: list) -> dict:
    """name -> its rows, for the rows named name@sS (one RL seed each)."""
    groups = {}
    for row in rows:
        name, _, seed = row["name"].rpartition("@s")
        if name and seed.isdigit():
            groups.setdefault(name, []).append(row)
    return groups


def seeds_frontier(path, baseline: str = "ppo") -> tuple:
    """(a, b, residual sd) of VADER = a + b KL over the baseline@sS rows of an evaluate.py frontier."""
    rows = seeded(read_rows(path)).get(baseline, [])
    if len(rows) < 2:
        raise SystemExit(f"{path}: the frontier needs at least 2 rows named {baseline}@sS, found {len(rows)}")
    kl, vader = (np.array([float(r[key]) for r in rows]) for key in ("kl", "vader"))
    b, a = np.polyfit(kl, vader, 1)
    return a, b, float((vader - a - b * kl).std(ddof=2)) if len(rows) > 2 else float("nan")


def print_seeded(path, frontier: tuple) -> None:
    """Each seeded name of the frontier over its seeds: means (sd) and the distance above the line ± SE."""
    print("| reward model | seeds | VADER | gold | KL | above the frontier (± SE over seeds) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in seeded(read_rows(path)).items():
        values = {key: np.array([float(r[key]) for r in rows if r.get(key)]) for key in ("vader", "gold", "kl")}
        above = values["vader"] - frontier[0] - frontier[1] * values["kl"]
        se = above.std(ddof=1) / np.sqrt(len(above)) if len(above) > 1 else float("nan")
        print(f"| {name} | {len(rows)} | {mean_and_sd(values['vader'])} | {mean_and_sd(values['gold'])} | {mean_and_sd(values['kl'])} "
              f"| {above.mean():+.3f} ± {se:.3f} |")


def mean_and_sd(x: np.ndarray) -> str:
    """'mean (sd s)' over seeds; the mean alone for one seed, nothing for none."""
    if len(x) == 0:
        return ""
    return f"{x.mean():.3f} (sd {x.std(ddof=1):.3f})" if len(x) > 1 else f"{x.mean():.3f}"


def main(cfg: RoundsFiguresConfig) -> None:
    frontier = seeds_frontier(cfg.seeds, cfg.baseline) if cfg.seeds else None
    if frontier:
        print(f"seeds' frontier: VADER = {frontier[0]:.3f} + {frontier[1]:.4f} KL (residual sd {frontier[2]:.3f})")
        print_seeded(cfg.seeds, frontier)
    folders = [folder for folder in cfg.rounds.split(",") if folder]
    if folders:
        print("| run | policy | VADER | gold | KL | bits/byte | fragment % | above the frontier |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in folders:
        evals = sorted(Path(folder).glob("round_*/eval/frontier.csv"), key=lambda p: int(p.parts[-3].split("_")[1]))
        if not evals:
            print(f"{folder}: no evaluated round yet")
            continue
        for row in read_rows(evals[-1]):
            cell = lambda key: f"{float(row[key]):+.3f} ± {float(row[key + '_se']):.3f}" if row.get(key) else ""  # noqa: E731
            above = f"{float(row['vader']) - frontier[0] - frontier[1] * float(row['kl']):+.3f}" if frontier and row["name"] != "LM" else ""
            print(f"| {Path(folder).name} | {row['name']} | {cell('vader')} | {cell('gold')} | {float(row['kl']):.2f} ± {float(row['kl_se']):.2f} "
                  f"| {float(row['bits_per_byte']):.3f} | {100 * float(row['fragment_share']):.2f} | {above} |")


if __name__ == "__main__":
    main(parse_config(RoundsFiguresConfig, sys.argv[1:]))
