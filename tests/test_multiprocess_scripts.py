"""Every training script on two gloo processes at tiny size: it runs, checkpoints (written by one
process), resumes on both, and ends with the same parameters on both (each script checks that
itself and prints "parameters identical across 2 process(es)"; it raises otherwise)."""
from collections import Counter

import pytest
import torch
from launch import ROOT, accelerate_launch
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.reward import RewardModel
from palm_rlhf.training import read_metrics

IN_SYNC = "parameters identical across 2 process(es)"
# tiny runs of each script (the LM and reward checkpoints of the RL stages come from the fixture)
LM = ["--preset", "tiny", "--tokenizer", "bytes", "--corpus", "reviews", "--seq_len", "32", "--batch_size", "4", "--eval_every", "100",
      "--eval_batches", "1", "--sample_every", "1000", "--sample_len", "40", "--checkpoint_every", "1"]
REWARD = ["--lm_checkpoint", "none", "--preset", "tiny", "--batch_size", "4", "--max_len", "64", "--max_test", "8",
          "--eval_every", "100", "--finetune_last_n_layers", "1", "--checkpoint_every", "1"]
RL = ["--num_eval_prompts", "2", "--max_seq_len", "48", "--best_of", "1", "--checkpoint_every", "1"]
PPO = [*RL, "--rollout_batch_size", "2", "--minibatch_size", "2", "--epochs", "1"]
GRPO = [*RL, "--prompts_per_step", "1", "--group_size", "2", "--minibatch_size", "2"]
DPO = ["--batch_size", "2", "--max_pairs", "16", "--max_eval_pairs", "4", "--num_eval_prompts", "2", "--gen_len", "8",
       "--eval_every", "100", "--checkpoint_every", "1", "--warmup_steps", "1", "--max_len", "96"]


def rows_written(run_dir) -> Counter:
    """How often each (step, key) row appears in metrics.csv."""
    return Counter(tuple(line.split(",")[:2]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:])


def launch_twice(script, run_dir, first_args, resumed_args):
    """Runs `script` on two processes, then resumes it with `resumed_args`; returns both outputs."""
    first = accelerate_launch(ROOT / script, *first_args, "--out_dir", run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert IN_SYNC in first.stdout
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint"]  # no half-written copy left
    resumed = accelerate_launch(ROOT / script, *resumed_args, "--out_dir", run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert IN_SYNC in resumed.stdout
    assert max(rows_written(run_dir).values()) == 1  # one process logs: no row twice
    return first, resumed


@pytest.mark.parametrize("script, tiny", [pytest.param("train_ppo.py", PPO, marks=pytest.mark.slow), ("train_grpo.py", GRPO)])
def test_rl_stage_on_two_processes(tmp_path, checkpoints, script, tiny):  # noqa: F811
    run = tmp_path / "run"
    _, resumed = launch_twice(script, run, [*tiny, *checkpoints, "--iterations", "1"],
                              [*tiny, *checkpoints, "--iterations", "2"])
    assert "resumed at iteration 1" in resumed.stdout
    assert read_metrics(run / "metrics.csv")["score"][0] == [1, 2]
    assert not PaLM.from_pretrained(run / "final").finetune_modules


@pytest.mark.slow
def test_reward_model_on_two_processes(tmp_path):
    run = tmp_path / "run"
    _, resumed = launch_twice("train_reward.py", run, [*REWARD, "--steps", "1"], [*REWARD, "--steps", "2"])
    assert "resumed at step 1" in resumed.stdout
    assert read_metrics(run / "metrics.csv")["train_loss"][0] == [1, 2]
    RewardModel.from_pretrained(run / "final")


@pytest.mark.slow
def test_dpo_on_two_processes(tmp_path):
    torch.manual_seed(0)
    PaLM.from_config(PaLMConfig.from_name("tiny")).save(tmp_path / "lm")
    tiny = [*DPO, "--lm_checkpoint", tmp_path / "lm"]
    run = tmp_path / "run"
    launch_twice("train_dpo.py", run, [*tiny, "--steps", "1"], [*tiny, "--steps", "2"])
    assert read_metrics(run / "metrics.csv")["loss"][0] == [1, 2]
    assert PaLM.from_pretrained(run / "final").config.finetune_scopes == {}
