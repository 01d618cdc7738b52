import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.reward import RewardModel
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_eval_prompts", "3", "--rollout_batch_size", "4", "--minibatch_size", "4", "--epochs", "1",
        "--max_seq_len", "48", "--best_of", "1,2"]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_ppo.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny LM and a reward model on its base, saved as train_lm.py and train_reward.py leave them."""
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    palm.save(root / "lm")
    RewardModel(palm, num_binned_output=5).save(root / "reward")
    return ["--lm_checkpoint", str(root / "lm"), "--reward_checkpoint", str(root / "reward")]


def test_help_lists_every_option():
    out = run_script("--help")
    assert out.returncode == 0
    for option in ("--lm_checkpoint", "--reward_checkpoint", "--beta", "--kl_target", "--best_of", "--resume", "--mixed_precision"):
        assert option in out.stdout


def test_missing_checkpoints_get_a_clear_error(tmp_path):
    out = run_script("--lm_checkpoint", str(tmp_path / "nothing"), "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "run train_lm.py first" in out.stderr


def test_runs_end_to_end_resumes_and_leaves_a_loadable_policy(tmp_path, checkpoints):
    run = tmp_path / "run"
    out = run_script(*TINY, *checkpoints, "--iterations", "2", "--checkpoint_every", "1", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("before PPO (the LM)", "after PPO", "best-of-1, before PPO", "best-of-2, before PPO"):
        assert row in out.stdout
    metrics = read_metrics(run / "metrics.csv")
    for key in ("score", "kl", "vader", "approx_kl", "clip_fraction", "explained_variance", "eval_score", "eval_vader"):
        assert key in metrics, key
    assert metrics["score"][0] == [1, 2] and all(-1 <= v <= 1 for v in metrics["vader"][1])
    assert (run / "ppo.png").stat().st_size > 0

    policy = PaLM.from_pretrained(run / "final")
    assert not policy.finetune_modules  # adapters merged, the reward and critic scopes left out
    lm = PaLM.from_pretrained(checkpoints[1])
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), lm.state_dict().values()))

    out = run_script(*TINY, *checkpoints, "--iterations", "3", "--out_dir", str(run), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at iteration 2" in out.stdout
    assert read_metrics(run / "metrics.csv")["score"][0] == [1, 2, 3]
