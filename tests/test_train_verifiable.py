import re
import subprocess
import sys
from pathlib import Path

import torch

from palm_rlhf import PaLM
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_train_problems", "50", "--sft_steps", "3", "--sft_batch_size", "8", "--sft_warmup_steps", "1",
        "--grpo_steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--minibatch_size", "4",
        "--num_eval_problems", "4", "--eval_samples", "8", "--num_curve_problems", "2", "--eval_every", "2"]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_verifiable.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_help_lists_every_stage():
    out = run_script("--help")
    assert out.returncode == 0
    for option in ("--sft_steps", "--grpo_steps", "--group_size", "--beta", "--eval_samples", "--pass_at", "--lm_checkpoint"):
        assert option in out.stdout


def test_runs_end_to_end_prints_pass_at_k_and_reuses_the_sft_model(tmp_path):
    run = tmp_path / "run"
    out = run_script(*TINY, "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 problems x 8 samples" in out.stdout
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if re.match(r"(pass@\d+|greedy) ", line)}
    assert set(rows) == {"pass@1", "pass@8", "greedy"}
    for line in rows.values():  # mean +- standard error, after SFT and after GRPO, all in [0, 1]
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", line)]
        assert len(numbers) == 4 and all(0 <= x <= 1 for x in numbers)
    for path in ("sft/model.safetensors", "sft/sft_settings.json", "final/model.safetensors", "metrics.csv", "verifiable.png"):
        assert (run / path).stat().st_size > 0, path
    metrics = read_metrics(run / "metrics.csv")
    assert metrics["sft_loss"][0] == [1, 2, 3]
    assert metrics["score"][0] == [4, 5]  # GRPO steps continue the SFT steps' axis
    assert metrics["heldout_pass@1"][0] == [2, 3, 5]  # every 2 steps of each stage, and at each stage's end
    policy, sft = PaLM.from_pretrained(run / "final"), PaLM.from_pretrained(run / "sft")
    assert not policy.finetune_modules
    # every answer of a 3-step SFT model is wrong, so every advantage is 0 and the merged policy is the SFT model
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft.state_dict().values()))

    again = run_script(*TINY, "--grpo_steps", "1", "--out_dir", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the fine-tuned model" in again.stdout
    assert read_metrics(run / "metrics.csv")["sft_loss"][0] == [1, 2, 3]  # no second SFT

    changed = run_script(*TINY, "--sft_steps", "4", "--out_dir", str(run))
    assert changed.returncode != 0 and "other settings (sft_steps)" in changed.stderr


def test_bad_pass_at_gets_a_clear_error(tmp_path):
    out = run_script(*TINY, "--pass_at", "1,16", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "--pass_at 1,16" in out.stderr
