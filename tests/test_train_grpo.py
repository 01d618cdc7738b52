import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import PaLM
from palm_rlhf.data import review_prompts, vader_compound
from palm_rlhf.rl_stage import human_texts, load_models
from palm_rlhf.reward import RewardModel
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train_grpo import TrainGRPOConfig  # noqa: E402
TINY = ["--num_eval_prompts", "3", "--prompts_per_step", "2", "--group_size", "3", "--minibatch_size", "3",
        "--max_seq_len", "48", "--best_of", "1,2"]


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
    assert metrics["score"][0] == [1, 2]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for iteration, logged in zip(*metrics["vader"]):  # the logged VADER is that of the iteration's responses
        responses = [s["response"] for s in samples if s["iteration"] == iteration]
        assert len(responses) == 2 * 3 and logged == pytest.approx(sum(vader_compound(responses)) / len(responses))
    assert {s["prompt"] for s in samples} <= set(review_prompts())
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


@pytest.mark.slow
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


def test_an_ensembles_members_are_standardised_on_the_human_snippets_without_dropout(tmp_path, checkpoints):  # noqa: F811
    lm, reward = checkpoints[1], checkpoints[3]
    torch.manual_seed(1)
    RewardModel(PaLM.from_pretrained(lm), num_binned_output=5, dropout=0.5).save(tmp_path / "reward_2")
    cfg = TrainGRPOConfig(lm_checkpoint=lm, reward_checkpoint=f"{reward},{tmp_path / 'reward_2'}", ensemble="mean")
    palm, ensemble = load_models(cfg)
    _, again = load_models(cfg)
    torch.testing.assert_close(ensemble.shift, again.shift, rtol=0, atol=0)  # calibration draws no dropout noise
    calibration = human_texts(palm.tokenizer, cfg.prompt_words)
    with torch.no_grad():
        standardised = (ensemble.raw_scores(*calibration) - ensemble.shift[:, None]) / ensemble.scale[:, None]
    torch.testing.assert_close(standardised.mean(dim=1), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.std(dim=1), torch.ones(2), atol=1e-4, rtol=0)
