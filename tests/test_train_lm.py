import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch

from palm_rlhf import PaLM
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--tokenizer", "bytes", "--corpus", "reviews", "--seq_len", "32", "--batch_size", "4",
        "--eval_every", "5", "--eval_batches", "2", "--sample_every", "1000", "--sample_len", "40"]


def train_args(tmp_path, run, *extra):
    return [*TINY, "--out_dir", str(tmp_path / run), "--cache_dir", str(tmp_path / "cache"), *extra]


def run_script(args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train_lm.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, **kwargs)


def losses(run_dir):
    return read_metrics(run_dir / "metrics.csv")["train_loss"]


def start_and_stop(args, run_dir, after_step, sig):
    """Starts a run and sends `sig` once metrics.csv shows `after_step`; returns the exit code."""
    process = subprocess.Popen([sys.executable, str(ROOT / "train_lm.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        csv = run_dir / "metrics.csv"
        if csv.exists() and f"\n{after_step},train_loss" in csv.read_text():
            process.send_signal(sig)
            break
        time.sleep(0.05)
    process.communicate(timeout=120)
    return process.returncode


def test_help_lists_every_option():
    out = run_script(["--help"])
    assert out.returncode == 0
    assert "--resume" in out.stdout and "--mixed_precision" in out.stdout and "model size" in out.stdout


def test_a_wrong_argument_gets_a_clear_error():
    out = run_script(["--steps", "many"])
    assert out.returncode == 2 and "invalid" in out.stderr and "--steps" in out.stderr


def test_runs_end_to_end_and_leaves_a_loadable_checkpoint(tmp_path):
    out = run_script(train_args(tmp_path, "run", "--steps", "10"))
    assert out.returncode == 0, out.stderr[-2000:]
    palm = PaLM.from_pretrained(tmp_path / "run" / "final")
    assert palm.config.dim == 64
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    metrics = read_metrics(tmp_path / "run" / "metrics.csv")
    assert metrics["val_bpb"][0] == [5, 10]
    assert torch.isfinite(palm(torch.randint(0, 256, (1, 8)))).all()


@pytest.mark.parametrize("sig, resume_from", [(signal.SIGKILL, "checkpoint"), pytest.param(signal.SIGINT, "stop", marks=pytest.mark.slow)])
def test_a_killed_run_resumed_gives_the_losses_of_an_uninterrupted_run(tmp_path, sig, resume_from):
    steps = ["--steps", "120", "--checkpoint_every", "4", "--seed", "3"]
    assert run_script(train_args(tmp_path, "straight", *steps)).returncode == 0
    killed = tmp_path / "killed"
    code = start_and_stop(train_args(tmp_path, "killed", *steps), killed, after_step=9, sig=sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    out = run_script(train_args(tmp_path, "killed", *steps, "--resume"))
    assert out.returncode == 0, out.stderr[-2000:]
    steps_straight, loss_straight = losses(tmp_path / "straight")
    steps_resumed, loss_resumed = losses(killed)
    assert steps_resumed == steps_straight == list(range(1, 121))
    assert loss_resumed == loss_straight
    final_straight = PaLM.from_pretrained(tmp_path / "straight" / "final").state_dict()
    final_resumed = PaLM.from_pretrained(killed / "final").state_dict()
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    out = run_script(train_args(tmp_path, "none", "--steps", "2", "--resume"))
    assert out.returncode != 0 and "no checkpoint" in out.stderr


def test_two_processes_train_in_sync(tmp_path):
    out = accelerate_launch(ROOT / "train_lm.py", *train_args(tmp_path, "ddp", "--steps", "4"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameters identical across 2 process(es)" in out.stdout
    PaLM.from_pretrained(tmp_path / "ddp" / "final")
