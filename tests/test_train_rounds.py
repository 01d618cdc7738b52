"""train_rounds.py end to end at tiny size: a round against the live feedback app on 127.0.0.1, the
simulated crowd answering over HTTP, killed in the middle of answering and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import pad

pytest.importorskip("django")
ROOT = Path(__file__).resolve().parents[1]
TINY_RL = ("--num_eval_prompts 3 --rollout_batch_size 4 --minibatch_size 4 --epochs 1 --max_seq_len 48 --best_of 1 "
           "--iterations 2 --checkpoint_every 1")
SCRIPT_ARGS = json.dumps({
    "train_reward": "--finetune_last_n_layers 2 --steps 2 --batch_size 4 --max_test 8 --eval_every 2",
    "train_ppo": TINY_RL,
    "evaluate": "--num_prompts 4 --samples 2 --batch_size 16",
})


def learn_to_end(palm, steps: int = 60):
    """A few steps on short texts that end in EOS, so that the tiny LM's samples end (only ended
    responses are asked about), as a trained LM's do."""
    tokenizer = palm.tokenizer
    words = ["good", "bad", "fine", "dull", "great", "odd"]
    optimizer = torch.optim.Adam(palm.parameters(), lr=3e-3)
    for step in range(steps):
        texts = [f"The movie is {words[(step + i) % 6]} {words[(step * i) % 6]}." for i in range(16)]
        seq, mask = pad([tokenizer.encode_prompt(t).tolist() + [tokenizer.eos_id] for t in texts], palm.pad_id)
        palm(seq, return_loss=True, mask=mask).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny LM, a reward model and a gold model on it, as train_lm.py and train_reward.py leave them."""
    root = tmp_path_factory.mktemp("rounds")
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    learn_to_end(palm)
    palm.save(root / "lm")
    RewardModel(palm).save(root / "reward")
    torch.manual_seed(1)
    gold = RewardModel(PaLM.from_pretrained(root / "lm"))
    torch.nn.init.normal_(gold.to_pred.weight, std=1.0)  # a gold whose scores vary, so its raters do not only tie
    gold.save(root / "gold")
    return root


def command(stages, out_dir, *more):
    return [sys.executable, str(ROOT / "train_rounds.py"), "--rounds", "1", "--answers", "6", "--pool_prompts", "12",
            "--samples", "3", "--ensemble_size", "2", "--raters", "2", "--batch_size", "16", "--max_seq_len", "80",
            "--lm_checkpoint", str(stages / "lm"), "--reward_checkpoint", str(stages / "reward"),
            "--policy_checkpoint", str(stages / "lm"), "--gold_checkpoint", str(stages / "gold"),
            "--script_args", SCRIPT_ARGS, "--out_dir", str(out_dir), *more]


def test_help_and_bad_settings(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train_rounds.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--chooser" in out.stdout and "--crowd" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "train_rounds.py"), "--chooser", "best"], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown chooser 'best'" in out.stderr.strip().splitlines()[-1]
    out = subprocess.run([sys.executable, str(ROOT / "train_rounds.py"), "--lm_checkpoint", str(tmp_path / "none"),
                          "--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "run train_lm.py first" in out.stderr


def test_a_round_end_to_end_killed_while_answering_and_resumed(stages, tmp_path):
    out_dir = tmp_path / "rounds"
    answers = out_dir / "round_1" / "answers.jsonl"
    # killed with its whole process group (the app's server with it) once two answers are acknowledged
    killed = subprocess.Popen(command(stages, out_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and killed.poll() is None:
        if answers.is_file() and len(answers.read_text().splitlines()) >= 2:
            os.killpg(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the round ended before it could be killed while answering"
    before = answers.read_text().splitlines()
    assert not (out_dir / "round_1" / "done" / "answer.json").exists()

    out = subprocess.run(command(stages, out_dir), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    done = out_dir / "round_1" / "done"
    assert sorted(p.stem for p in done.iterdir()) == sorted(
        ["sample", "choose", "publish", "answer", "export", "reward", "rl", "evaluate"])

    logged = [json.loads(line) for line in answers.read_text().splitlines()]
    assert answers.read_text().splitlines()[: len(before)] == before  # the killed run's answers kept
    assert len({a["item"] for a in logged}) == len(logged) >= 5  # no pair answered twice; at most one unlogged
    export = json.loads((done / "export.json").read_text())
    preferences = sum(a["choice"] in ("a", "b") for a in logged)
    # the kill may fall between the app's acknowledgement and the log's line: then the app holds one more
    assert export["acknowledged_preferences"] == preferences and export["missing"] == 0
    assert export["exported_pairs"] == preferences + export["answered_unlogged"] and export["answered_unlogged"] <= 1
    assert json.loads((done / "reward.json").read_text())["trained_on_pairs"] == export["exported_pairs"]

    frontier = (out_dir / "round_1" / "eval" / "frontier.csv").read_text().splitlines()
    header = frontier[0].split(",")
    assert "gold" in header and "fragment_share" in header
    assert {line.split(",")[0] for line in frontier[1:]} >= {"round@0", "round@1"}

    # everything done: a rerun does nothing; other settings in the same folder are refused in one line
    again = subprocess.run(command(stages, out_dir), capture_output=True, text=True)
    assert again.returncode == 0 and "== round" not in again.stdout
    other = subprocess.run(command(stages, out_dir, "--chooser", "uniform"), capture_output=True, text=True)
    assert other.returncode != 0 and "--chooser" in other.stderr.strip().splitlines()[-1]


def test_people_answer_in_the_app_and_the_round_waits_for_them(stages, tmp_path):
    from palm_rlhf.feedback.crowd import answer_comparisons, make_accounts, serving

    out_dir = tmp_path / "people"
    first = command(stages, out_dir, "--crowd", "people", "--chooser", "uniform", "--ensemble_size", "1", "--round", "1")
    out = subprocess.run(first, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 of 6 answers in" in out.stdout and not (out_dir / "round_1" / "done" / "answer.json").exists()
    assert (out_dir / "round_1" / "done" / "publish.json").exists()

    data_dir = out_dir / "feedback_data"
    with serving(data_dir) as url:  # people, here two accounts answering through the app
        answer_comparisons(url, make_accounts(data_dir, ["ann", "bob"]), lambda rater, prompt, a, b: "a")
    out = subprocess.run(first + ["--step", "answer"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((out_dir / "round_1" / "done" / "answer.json").read_text()) == dict(acknowledged=6)
