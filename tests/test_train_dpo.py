import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.data import write_jsonl
from palm_rlhf.dpo import DPOTrainer
from palm_rlhf.config import parse_config
from palm_rlhf.training import read_metrics

# the script is run in-process (faster than a subprocess, and a crash can be injected); it is a file
# at the repository root, not a module of the package
_spec = importlib.util.spec_from_file_location("train_dpo", Path(__file__).resolve().parents[1] / "train_dpo.py")
train_dpo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_dpo)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "final"
    PaLM.from_config(PaLMConfig.from_name("tiny")).save(path)
    return path


def config(lm_checkpoint, out_dir, *extra):
    return parse_config(train_dpo.TrainDPOConfig, [
        "--lm_checkpoint", str(lm_checkpoint), "--out_dir", str(out_dir), "--steps", "4", "--batch_size", "2",
        "--max_pairs", "32", "--max_eval_pairs", "8", "--num_eval_prompts", "4", "--gen_len", "8",
        "--eval_every", "2", "--checkpoint_every", "2", "--warmup_steps", "1", "--lr", "1e-2", *extra,
    ])


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_end_to_end_leaves_a_merged_model_metrics_plot_and_summary(lm_checkpoint, tmp_path, method):
    summary = train_dpo.train(config(lm_checkpoint, tmp_path, "--method", method))
    final = PaLM.from_pretrained(tmp_path / "final")
    assert final.config.finetune_scopes == {}  # adapters merged
    base = load_file(str(lm_checkpoint / "model.safetensors"))
    assert any(not torch.equal(final.state_dict()[k], v) for k, v in base.items())  # training moved it

    metrics = read_metrics(tmp_path / "metrics.csv")
    assert metrics["loss"][0] == [1, 2, 3, 4]
    assert metrics["eval_pref_accuracy"][0] == [0, 2, 4]
    assert metrics["eval_pref_accuracy"][1][0] == 0.5  # policy == reference before training
    assert (tmp_path / f"{method}.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(summary)
    for key in ("pref_accuracy", "vader_before", "vader_after", "kl_per_token", "kl_per_response"):
        assert math.isfinite(summary[key])
    assert summary["kl_per_token"] > 0


def test_resume_after_a_crash_matches_an_uninterrupted_run(lm_checkpoint, tmp_path, monkeypatch):
    short = ("--steps", "2", "--checkpoint_every", "1")
    train_dpo.train(config(lm_checkpoint, tmp_path / "whole", *short))

    train_step = DPOTrainer.train_step

    def crash_after_step_1(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(DPOTrainer, "train_step", crash_after_step_1)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.train(config(lm_checkpoint, tmp_path / "resumed", *short))
    monkeypatch.setattr(DPOTrainer, "train_step", train_step)
    train_dpo.train(config(lm_checkpoint, tmp_path / "resumed", *short, "--resume"))

    whole = load_file(str(tmp_path / "whole/final/model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/final/model.safetensors"))
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value)


def test_jsonl_input_and_clear_errors(lm_checkpoint, tmp_path):
    ratings = tmp_path / "ratings.jsonl"
    write_jsonl(ratings, [dict(prompt="Q:", response=f"answer {i}", rating=i % 5 + 1) for i in range(20)])
    summary = train_dpo.train(config(lm_checkpoint, tmp_path / "kto", "--method", "kto", "--train_file", str(ratings),
                                     "--steps", "1"))
    assert math.isfinite(summary["pref_accuracy"])
    with pytest.raises(SystemExit, match="needs JSONL records"):
        train_dpo.train(config(lm_checkpoint, tmp_path / "dpo", "--train_file", str(ratings)))
    with pytest.raises(SystemExit, match="--method ppo: unknown method"):
        train_dpo.train(config(lm_checkpoint, tmp_path / "x", "--method", "ppo"))
    with pytest.raises(SystemExit, match="run train_lm.py first"):
        train_dpo.train(config(tmp_path / "missing", tmp_path / "y"))
