"""Iterated RLHF: people compare the policy's own samples, the reward model is refit on their answers,
RL runs again, round after round (InstructGPT's and Llama 2's rounds; Bai et al. 2022's online RLHF).

    python train_rounds.py                              # 3 rounds of 2,000 answers from the simulated crowd
    python train_rounds.py --chooser uniform --ensemble_size 1 --out_dir runs/rounds_uniform    # the baseline
    python train_rounds.py --crowd people               # publish to the feedback app; rerun once people answered
    python train_rounds.py --round 2 --step reward      # one step of one round alone

Round 0 is today's pipeline: the LM (train_lm.py), the reward model (train_reward.py) and the policy
of train_ppo.py (--method ppo) or train_grpo.py (rloo), trained here if their folders are missing,
and the ensemble members beside the reward model (other seeds) that choose what to ask. Round k >= 1:

1. sample    round k-1's policy answers --pool_prompts training prompts (openings of train-split
             snippets, drawn anew each round; never the held-out ones) --samples times each.
2. choose    round k-1's reward models score the samples; --chooser picks --answers / --overlap pairs
             (palm_rlhf/rounds.py: ensemble disagreement, the least certain margin, or uniform).
3. publish   the pairs become comparison items of the feedback app (`import`, pair lines).
4. answer    --crowd gold: simulated raters (palm_rlhf/crowd.py, a gold reward model plus the real
             raters' noise) log in and answer through the app over HTTP, each acknowledged answer
             logged as it comes; --crowd people: the step reports how many are answered and ends,
             to be run again when people have answered.
5. export    every answer of every round from the app's export; the answers the simulated crowd
             saw acknowledged are counted against it (none may be missing; people keep no such log).
6. reward    the reward model and the other ensemble members refit on the human snippets plus every
             pair collected so far (train_reward.py --pairs), each from the LM as in round 0.
7. rl        the RL stage again, from the LM, against the refit reward model, at its defaults.
8. evaluate  evaluate.py on the held-out prompts: one curve over the rounds' policies, VADER, the
             gold score, the fragment share, KL to the LM.

Each step leaves round_<k>/done/<step>.json (what it made, its counts); a rerun skips done steps, the
scripts a step runs resume from their own checkpoints (--resume), and the answer step asks the app
for what is still open, so a round killed anywhere continues where it stopped and loses no answer.
--script_args passes flags to the scripts (tests run every stage at tiny size through it).
"""
import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from palm_rlhf.config import SettingError, check_settings, parse_config, setting
from palm_rlhf.data import RATED_SETS, review_prompts
from palm_rlhf.rl import RLConfig

ROOT = Path(__file__).resolve().parent
STEPS = ("sample", "choose", "publish", "answer", "export", "reward", "rl", "evaluate")


@dataclass
class TrainRoundsConfig:
    """Rounds of iterated RLHF: sample, choose pairs, collect answers in the feedback app, refit the reward model, RL, evaluate."""

    rounds: int = setting(3, "rounds after round 0 (today's pipeline)", at_least=1)
    answers: int = setting(2000, "answers collected per round (pairs x --overlap)", at_least=1)
    overlap: int = setting(1, "raters per pair", at_least=1)
    chooser: str = setting("disagreement", "which pairs to ask about", choices=("disagreement", "margin", "uniform"))
    ensemble_size: int = setting(2, "reward models (seeds) that choose; the first is RL's reward", at_least=1)
    pool_prompts: int = setting(4000, "training prompts sampled per round", at_least=1)
    samples: int = setting(4, "responses per prompt; every pair of them is a candidate", at_least=2)
    per_prompt: int = setting(1, "pairs asked about one prompt, at most", at_least=1)
    method: str = setting("ppo", "the RL stage: train_ppo.py or train_grpo.py's RLOO", choices=("ppo", "rloo"))
    crowd: str = setting("gold", "who answers: the simulated crowd, or people in the app", choices=("gold", "people"))
    raters: int = setting(10, "simulated raters (accounts in the app)", at_least=1)
    lm_checkpoint: str = setting("runs/lm/final", "train_lm.py's final folder")
    reward_checkpoint: str = setting("runs/reward/final", "round 0's reward model (train_reward.py's default run)")
    policy_checkpoint: str = setting("", "round 0's policy; empty: out_dir/round_0/policy, trained here")
    gold_checkpoint: str = setting("runs/gold/final", "the gold reward model (trained here on every rated set if missing)")
    round: int | None = setting(None, "run only this round (with --step, only that step)", at_least=0)
    step: str | None = setting(None, "run only this step of --round", choices=STEPS)
    script_args: str = setting("", "flags for the scripts, as JSON {\"train_reward\": \"--steps 2\", \"train_ppo\": ..., \"train_grpo\": ..., \"evaluate\": ..., \"gold\": ...}")
    batch_size: int = setting(64, "sequences per sampling and scoring batch", at_least=1)
    max_seq_len: int = setting(RLConfig.max_seq_len, "as the RL scripts': prompt + response tokens", at_least=2)
    out_dir: str = setting("runs/rounds", "round_<k>/ folders and the app's data (feedback_data/)")
    seed: int = setting(0, "seed of the prompts drawn, the sampling, the chooser and the crowd")

    def __post_init__(self):
        check_settings(self)
        if self.chooser == "disagreement" and self.ensemble_size < 2:
            raise SettingError("ensemble_size", self.ensemble_size, "the disagreement chooser needs at least 2 reward models")
        if self.crowd == "gold" and self.overlap > self.raters:
            raise SettingError("overlap", self.overlap, f"more than the {self.raters} --raters, who answer each pair once each")


# ---------------------------------------------------------------------------------------------------
# the parts a step reads


def round_dir(cfg, k: int) -> Path:
    return Path(cfg.out_dir) / f"round_{k}"


def app_dir(cfg) -> Path:
    return Path(cfg.out_dir) / "feedback_data"


def extra_args(cfg, script: str) -> list:
    return shlex.split(json.loads(cfg.script_args or "{}").get(script, ""))


def run_script(script: str, *args, extra: str | None = None) -> None:
    """One of the stage scripts in a subprocess, its output passed through; a failure ends the round."""
    command = [sys.executable, str(ROOT / f"{script}.py"), *map(str, args)]
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"train_rounds.py: {script}.py failed; fix it and run the same command again to resume")


def run_app(cfg, *args) -> str:
    command = [sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(app_dir(cfg)), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train_rounds.py: feedback {args[0]}: {done.stderr.strip()[-500:]}")
    return done.stdout


def resumable(out_dir: Path) -> list:
    return ["--resume"] if (out_dir / "checkpoint").is_dir() else []


def rl_script(cfg) -> str:
    return "train_ppo" if cfg.method == "ppo" else "train_grpo"


def policy_dir(cfg, k: int) -> Path:
    if k == 0 and cfg.policy_checkpoint:
        return Path(cfg.policy_checkpoint)
    return round_dir(cfg, k) / "policy" / "final"


def reward_dirs(cfg, k: int) -> list:
    """Round k's reward models, the first RL's reward: (ensemble_size,) final folders."""
    members = [round_dir(cfg, k) / f"reward_s{s}" / "final" for s in range(cfg.ensemble_size)]
    return [Path(cfg.reward_checkpoint)] + members[1:] if k == 0 else members


def write_json(path: Path, record) -> None:
    """Written whole or not at all: a crash mid-write leaves no half file for a rerun to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, ensure_ascii=False, indent=1))
    os.replace(partial, path)


def read_json(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# round 0: today's pipeline, the gold model, the ensemble


def train_gold(cfg) -> None:
    """Gao et al.'s gold model: every rated set, every layer tuned (the proxy tunes 3), twice the steps."""
    out = Path(cfg.gold_checkpoint).parent
    depth = read_json(Path(cfg.lm_checkpoint) / "config.json")["depth"]
    run_script("train_reward", "--lm_checkpoint", cfg.lm_checkpoint, "--data", "+".join(RATED_SETS), "--finetune_last_n_layers", depth,
               "--steps", "800", "--out_dir", out, *resumable(out), *extra_args(cfg, "gold"))


def round_zero(cfg) -> None:
    if cfg.crowd == "gold" and not Path(cfg.gold_checkpoint).is_dir():
        train_gold(cfg)
    if not Path(cfg.reward_checkpoint).is_dir():
        out = Path(cfg.reward_checkpoint).parent
        run_script("train_reward", "--lm_checkpoint", cfg.lm_checkpoint, "--out_dir", out, *resumable(out), *extra_args(cfg, "train_reward"))
    for s, member in enumerate(reward_dirs(cfg, 0)[1:], start=1):
        if not member.is_dir():
            out = member.parent
            run_script("train_reward", "--lm_checkpoint", cfg.lm_checkpoint, "--seed", s, "--out_dir", out, *resumable(out),
                       *extra_args(cfg, "train_reward"))
    if not policy_dir(cfg, 0).is_dir():
        train_policy(cfg, 0, cfg.reward_checkpoint)


def train_policy(cfg, k: int, reward: Path) -> None:
    out = round_dir(cfg, k) / "policy"
    run_script(rl_script(cfg), "--lm_checkpoint", cfg.lm_checkpoint, "--reward_checkpoint", reward, "--out_dir", out,
               *resumable(out), *extra_args(cfg, rl_script(cfg)))


# ---------------------------------------------------------------------------------------------------
# the steps of round k >= 1


def step_sample(cfg, k: int) -> dict:
    """--samples responses of round k-1's policy to --pool_prompts training prompts, drawn anew each round."""
    import torch

    import evaluate
    from palm_rlhf import PaLM

    policy = PaLM.from_pretrained(policy_dir(cfg, k - 1)).eval()
    encode = lambda text: policy.tokenizer.encode_prompt(text).tolist()  # noqa: E731
    # the RL scripts' response budget: max_seq_len less their longest prompt; longer pool prompts are left out
    longest = max(len(encode(p)) for p in review_prompts(4))
    texts = [t for t in review_prompts(4, split="train") if len(encode(t)) <= longest]
    rng = np.random.default_rng([cfg.seed, k])
    prompts = [texts[i] for i in sorted(rng.choice(len(texts), size=min(cfg.pool_prompts, len(texts)), replace=False))]
    heads = [encode(p) for p in prompts]
    budget = cfg.max_seq_len - longest
    sampling = SimpleNamespace(batch_size=cfg.batch_size, temperature=1.0)  # what evaluate's sampler reads
    with torch.no_grad():
        tails = evaluate.sample_responses(policy, heads, cfg.samples, budget, sampling, seed=cfg.seed * 1000 + k)
    responses = evaluate.response_texts(tails, policy.tokenizer)
    ended = [bool(t) and t[-1] == policy.tokenizer.eos_id for t in tails]
    records = [dict(prompt=p, responses=responses[i * cfg.samples : (i + 1) * cfg.samples],
                    ended=ended[i * cfg.samples : (i + 1) * cfg.samples]) for i, p in enumerate(prompts)]
    write_json(round_dir(cfg, k) / "candidates.json", records)
    return dict(prompts=len(prompts), responses=len(responses), ended=sum(ended))


def step_choose(cfg, k: int) -> dict:
    """Scores of every candidate by round k-1's reward models, then the chooser's pairs."""
    from palm_rlhf.crowd import score_texts
    from palm_rlhf.reward import RewardModel
    from palm_rlhf.rounds import choose_pairs

    candidates = read_json(round_dir(cfg, k) / "candidates.json")
    sides = [(c["prompt"], r) for c in candidates for r in c["responses"]]
    members = reward_dirs(cfg, k - 1) if cfg.chooser != "uniform" else []
    scores = np.stack([score_texts(RewardModel.from_pretrained(m), sides, cfg.batch_size) for m in members]) if members \
        else np.zeros((1, len(sides)))
    scores = scores.reshape(len(scores), len(candidates), cfg.samples)  # (members, prompts, samples)
    num_pairs = -(-cfg.answers // cfg.overlap)
    chosen = choose_pairs(scores, num_pairs, cfg.chooser, per_prompt=cfg.per_prompt, seed=cfg.seed * 1000 + k,
                          valid=valid_pairs(candidates))
    pairs = [dict(prompt=candidates[p]["prompt"], pair=[candidates[p]["responses"][i], candidates[p]["responses"][j]])
             for p, i, j in chosen]
    path = round_dir(cfg, k) / "pairs_to_ask.jsonl"
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    os.replace(partial, path)
    return dict(pairs=len(pairs), chooser=cfg.chooser, members=[str(m) for m in members])


def valid_pairs(candidates: list) -> np.ndarray:
    """(P, C): candidate pairs worth asking about: two different texts (equal ones carry no preference),
    both ended (a response cut at the length limit is scored by RL without its EOS, by people and the
    reward stage as a whole text) and both with something to read (the app refuses an empty text)."""
    from palm_rlhf.rounds import candidate_pairs

    pairs = candidate_pairs(len(candidates[0]["responses"]))
    readable = lambda text: bool(text.strip()) and "\0" not in text  # noqa: E731
    return np.array([[c["ended"][i] and c["ended"][j] and c["responses"][i] != c["responses"][j]
                      and readable(c["responses"][i]) and readable(c["responses"][j]) for i, j in pairs]
                     for c in candidates])


def step_publish(cfg, k: int) -> dict:
    out = run_app(cfg, "import", round_dir(cfg, k) / "pairs_to_ask.jsonl", "--overlap", cfg.overlap)
    return dict(app=out.strip())


def crowd_accounts(cfg) -> list:
    """The simulated raters' accounts, made once and kept (0600) beside the app's data."""
    from palm_rlhf.feedback.crowd import make_accounts

    path = Path(cfg.out_dir) / "crowd_accounts.json"
    accounts = [tuple(a) for a in read_json(path)] if path.is_file() else []
    for name in [f"crowd{i:02d}" for i in range(len(accounts), cfg.raters)]:
        # saved one by one: a crash between making an account and saving its password would lock it out
        accounts += make_accounts(app_dir(cfg), [name])
        write_json(path, accounts)
        path.chmod(0o600)
    return accounts


def round_progress(cfg, asked: list) -> tuple:
    """(answers wanted, answers given) for the items of this round's pairs, read from the app's database
    (only the app writes it); a pair stored in an earlier round is that round's item, answered there."""
    from palm_rlhf.feedback.__main__ import setup_django

    setup_django(str(app_dir(cfg)))
    from palm_rlhf.feedback.models import Answer
    from palm_rlhf.feedback.tasks import pair_items

    items = {item.pk: item.overlap for p in asked for item in pair_items(p["prompt"], *p["pair"])}
    return sum(items.values()), Answer.objects.filter(item__in=list(items), answered_at__isnull=False).count()


def step_answer(cfg, k: int) -> dict | None:
    """The gold crowd answers through the app over HTTP; for people, how many are answered so far."""
    asked = [json.loads(line) for line in (round_dir(cfg, k) / "pairs_to_ask.jsonl").read_text(encoding="utf-8").splitlines()]
    if cfg.crowd == "people":
        wanted, answered = round_progress(cfg, asked)
        if answered < wanted:
            print(f"round {k}: {answered} of {wanted} answers in; serve the app "
                  f"(python -m palm_rlhf.feedback --data-dir {app_dir(cfg)} serve) and run this command again once all are in")
            return None
        return dict(acknowledged=answered)
    from palm_rlhf.crowd import GoldCrowd
    from palm_rlhf.feedback.crowd import answer_comparisons, read_log, serving

    crowd = GoldCrowd.from_pretrained(cfg.gold_checkpoint, seed=cfg.seed)
    crowd.human_scale([(p["prompt"], text) for p in asked for text in p["pair"]])  # scored in batches, before the clock
    accounts = crowd_accounts(cfg)
    log = round_dir(cfg, k) / "answers.jsonl"
    with serving(app_dir(cfg)) as base_url:
        answer_comparisons(base_url, accounts, crowd.judge, log_path=log)
    answers = read_log(log)
    wanted, answered = round_progress(cfg, asked)
    if answered < wanted:
        raise SystemExit(f"train_rounds.py: the app holds {answered} of the {wanted} answers this round wants after the crowd ran")
    choices = {c: sum(a["choice"] == c for a in answers) for c in ("a", "b", "tie", "skip")}
    return dict(acknowledged=len(answers), **choices)


def step_export(cfg, k: int) -> dict:
    """The app's export of every pair answered so far (what the reward model trains on), counted
    against the preferences the crowd saw acknowledged: none may be missing. The export may hold more:
    an answer the app acknowledged to a crowd killed before it logged the acknowledgement."""
    from palm_rlhf.feedback.crowd import read_log

    path = round_dir(cfg, k) / "pairs.jsonl"
    run_app(cfg, "export", "--pairs", path)
    exported = Counter((p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, path.read_text(encoding="utf-8").splitlines()))
    logged = [a for j in range(1, k + 1) for a in read_log(round_dir(cfg, j) / "answers.jsonl") if a["choice"] in ("a", "b")]
    acked = Counter((a["prompt"], *((a["a"], a["b"]) if a["choice"] == "a" else (a["b"], a["a"]))) for a in logged)
    missing = sum((acked - exported).values())
    if missing:
        raise SystemExit(f"train_rounds.py: {missing} of the {len(logged)} preferences the app acknowledged are missing from its export")
    return dict(exported_pairs=sum(exported.values()), acknowledged_preferences=len(logged), missing=0,
                answered_unlogged=sum((exported - acked).values()))


def step_reward(cfg, k: int) -> dict:
    pairs = round_dir(cfg, k) / "pairs.jsonl"
    for s, member in enumerate(reward_dirs(cfg, k)):
        out = member.parent
        run_script("train_reward", "--lm_checkpoint", cfg.lm_checkpoint, "--pairs", pairs, "--seed", s, "--out_dir", out,
                   *resumable(out), *extra_args(cfg, "train_reward"))
    return dict(trained_on_pairs=sum(1 for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()),
                members=[str(m) for m in reward_dirs(cfg, k)])


def step_rl(cfg, k: int) -> dict:
    train_policy(cfg, k, reward_dirs(cfg, k)[0])
    return dict(policy=str(policy_dir(cfg, k)))


def step_evaluate(cfg, k: int) -> dict:
    policies = ",".join(f"round@{j}={policy_dir(cfg, j)}" for j in range(k + 1))
    gold = ["--gold_checkpoint", cfg.gold_checkpoint] if Path(cfg.gold_checkpoint).is_dir() else []
    out = round_dir(cfg, k) / "eval"
    run_script("evaluate", "--policies", policies, "--lm_checkpoint", cfg.lm_checkpoint, "--reward_checkpoint",
               cfg.reward_checkpoint, *gold, "--best_of", "", "--out_dir", out, *extra_args(cfg, "evaluate"))
    return dict(frontier=str(out / "frontier.csv"))


STEP_FUNCTIONS = dict(sample=step_sample, choose=step_choose, publish=step_publish, answer=step_answer,
                      export=step_export, reward=step_reward, rl=step_rl, evaluate=step_evaluate)


def run_step(cfg, k: int, step: str) -> bool:
    """Runs one step unless it is done; False when it could not finish (people have not answered yet)."""
    marker = round_dir(cfg, k) / "done" / f"{step}.json"
    if marker.is_file():
        return True
    print(f"\n== round {k}: {step}", flush=True)
    record = STEP_FUNCTIONS[step](cfg, k)
    if record is None:
        return False
    write_json(marker, record)
    print(f"round {k} {step}: {json.dumps(record)}", flush=True)
    return True


def check_same_settings(cfg) -> None:
    """A rerun continues the rounds it finds only with the settings they were made with (--round, --step,
    --rounds, to add rounds, and --batch_size aside)."""
    path = Path(cfg.out_dir) / "settings.json"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("round", "step", "rounds", "batch_size")}
    if path.is_file():
        changed = sorted(k for k, v in read_json(path).items() if settings.get(k) != v)
        if changed:
            raise SystemExit(f"train_rounds.py: {cfg.out_dir} holds rounds made with other settings ({', '.join(f'--{k}' for k in changed)}); "
                             "pass the same ones or another --out_dir")
    write_json(path, settings)


def main(cfg: TrainRoundsConfig) -> None:
    if cfg.step is not None and cfg.round is None:
        raise SystemExit("train_rounds.py: --step needs --round")
    if cfg.round == 0 and cfg.step is not None:
        raise SystemExit("train_rounds.py: round 0 has no steps; run it with --round 0")
    try:
        json.loads(cfg.script_args or "{}")
    except json.JSONDecodeError as error:
        raise SystemExit(f"train_rounds.py: --script_args is not JSON ({error.msg})") from None
    if not Path(cfg.lm_checkpoint).is_dir():
        raise SystemExit(f"train_rounds.py: --lm_checkpoint {cfg.lm_checkpoint}: no such folder; run train_lm.py first")
    check_same_settings(cfg)
    rounds = [cfg.round] if cfg.round is not None else range(cfg.rounds + 1)
    for k in rounds:
        if k == 0:
            round_zero(cfg)
            continue
        for step in [cfg.step] if cfg.step else STEPS:
            if not run_step(cfg, k, step):
                return
    frontier = round_dir(cfg, rounds[-1]) / "eval" / "frontier.csv"
    print(f"\nrounds done" + (f"; the last round's frontier: {frontier}" if frontier.is_file() else ""))


if __name__ == "__main__":
    main(parse_config(TrainRoundsConfig, sys.argv[1:]))
