import subprocess
import sys
from pathlib import Path

import torch
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import PaLM
from palm_rlhf.reward import RewardModel
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_eval_prompts", "3", "--prompts_per_step", "2", "--group_size", "3", "--minibatch_size", "3",
        "--max_seq_len", "40", "--best_of", "1,2"]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_grpo.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_help_lists_every_option():
    out = run_script("--help")
    assert out.returncode == 0
    for option in ("--estimator", "--group_size", "--prompts_per_step", "--beta", "--kl_in", "--loss_aggregation",
                   "--eps_clip_high", "--lr", "--iterations", "--resume", "--lm_checkpoint", "--reward_checkpoint"):
        assert option in out.stdout


def test_bad_options_get_a_one_line_error(tmp_path):
    out = run_script("--estimator", "ppo", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "unknown estimator 'ppo'; choose one of grpo, dr_grpo, rloo" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_script("--estimator", "rloo", "--group_size", "1", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "at least 2 samples per prompt" in out.stderr


def test_runs_end_to_end_resumes_and_leaves_a_loadable_policy(tmp_path, checkpoints):  # noqa: F811
    run = tmp_path / "run"
    out = run_script(*TINY, *checkpoints, "--iterations", "2", "--checkpoint_every", "1", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("before RLOO (the LM)", "after RLOO", "best-of-1, before RLOO", "best-of-2, before RLOO"):  # RLOO: the default
        assert row in out.stdout
    metrics = read_metrics(run / "metrics.csv")
    for key in ("score", "kl", "vader", "approx_kl", "clip_fraction", "zero_variance_groups", "eval_score", "eval_vader"):
        assert key in metrics, key
    assert metrics["score"][0] == [1, 2] and all(-1 <= v <= 1 for v in metrics["vader"][1])
    assert (run / "grpo.png").stat().st_size > 0

    policy = PaLM.from_pretrained(run / "final")
    assert not policy.finetune_modules  # adapters merged, the reward scope left out
    lm = PaLM.from_pretrained(checkpoints[1])
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), lm.state_dict().values()))

    out = run_script(*TINY, *checkpoints, "--iterations", "3", "--out_dir", str(run), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at iteration 2" in out.stdout
    assert read_metrics(run / "metrics.csv")["score"][0] == [1, 2, 3]


def test_rloo_without_a_reference(tmp_path, checkpoints):  # noqa: F811
    run = tmp_path / "rloo"
    out = run_script(*TINY, *checkpoints, "--estimator", "rloo", "--beta", "0", "--loss_aggregation", "constant",
                     "--iterations", "1", "--best_of", "1", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after RLOO" in out.stdout and "KL to the LM at the end: not measured" in out.stdout
    assert "kl" not in read_metrics(run / "metrics.csv")
    assert not PaLM.from_pretrained(run / "final").finetune_modules


def test_an_ensemble_of_reward_models(tmp_path, checkpoints):  # noqa: F811
    lm, reward = checkpoints[1], checkpoints[3]
    torch.manual_seed(1)
    RewardModel(PaLM.from_pretrained(lm), num_binned_output=5).save(tmp_path / "reward_2")  # another seed
    run = tmp_path / "run"
    out = run_script(*TINY, "--lm_checkpoint", lm, "--reward_checkpoint", f"{reward},{tmp_path / 'reward_2'}",
                     "--ensemble", "min", "--iterations", "1", "--best_of", "1", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after RLOO" in out.stdout and not PaLM.from_pretrained(run / "final").finetune_modules
    out = run_script(*TINY, "--lm_checkpoint", lm, "--reward_checkpoint", f"{reward},{tmp_path / 'missing'}", "--out_dir", str(run))
    assert out.returncode != 0 and "missing: no such folder; run train_reward.py first" in out.stderr
