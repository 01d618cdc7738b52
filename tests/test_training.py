import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from palm_rlhf import checkpoint, training
from palm_rlhf.config import parse_config


@dataclass
class ToyConfig:
    """A config for the parser tests."""

    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    corpus: str = field(default="wikitext2", metadata={"help": "corpus name"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    resume: bool = field(default=True, metadata={"help": "resume from run_dir/checkpoint"})
    max_pairs: Optional[int] = field(default=None, metadata={"help": "cap on preference pairs"})


def test_parse_config_round_trips_types_and_flags():
    assert parse_config(ToyConfig, []) == ToyConfig()
    config = parse_config(
        ToyConfig, ["--lr", "1e-3", "--steps", "7", "--compile", "--no-resume", "--max_pairs", "5"]
    )
    assert config == ToyConfig(lr=1e-3, steps=7, compile=True, resume=False, max_pairs=5)
    assert parse_config(ToyConfig, ["--max_pairs", "none"]).max_pairs is None


def test_parse_config_rejects_wrong_types_and_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--steps", "seven"])
    assert "invalid int value: 'seven'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--stepz", "7"])
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_help_lists_every_field_with_help_and_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--help"])
    help_text = capsys.readouterr().out
    assert "peak learning rate (default: 0.0003)" in help_text
    assert "--compile, --no-compile" in help_text


def test_warmup_cosine_schedule_shape():
    multiplier = training.lr_lambda_warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.55)
    assert multiplier(110) == pytest.approx(0.1) and multiplier(500) == pytest.approx(0.1)


class TiedModel(nn.Module):
    """Input and output share one weight, as in a language model with tied embeddings."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.relu(self.encode(x)))


def train_a_little(model, optimizer, scheduler, steps=3):
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def make_run(seed):
    torch.manual_seed(seed)
    model = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda_warmup_cosine(2, 10))
    return model, optimizer, scheduler


def draw_from_every_rng():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rngs(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    train_a_little(model, optimizer, scheduler)
    checkpoint.save_checkpoint(tmp_path / "checkpoint", model=model, optimizer=optimizer, scheduler=scheduler,
                             step=3, extra=dict(best_loss=0.5), config=dict(dim=4))
    draws_after_save = draw_from_every_rng()
    train_a_little(model, optimizer, scheduler)  # the original goes on from step 3
    continued = {k: v.clone() for k, v in model.state_dict().items()}

    trainer_state = torch.load(tmp_path / "checkpoint/trainer_state.pt", weights_only=True)
    assert trainer_state["step"] == 3

    fresh, fresh_optimizer, fresh_scheduler = make_run(seed=1)
    restored = checkpoint.load_checkpoint(tmp_path / "checkpoint", model=fresh, optimizer=fresh_optimizer,
                                        scheduler=fresh_scheduler)
    assert restored == dict(step=3, extra=dict(best_loss=0.5))
    assert draw_from_every_rng() == draws_after_save
    assert fresh.decode.weight is fresh.encode.weight  # loading kept the tie
    assert fresh_scheduler.last_epoch == 3
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 3

    train_a_little(fresh, fresh_optimizer, fresh_scheduler)  # the resumed run repeats the original
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, continued[name]), name


def test_a_checkpoint_sharded_by_zero_or_fsdp_will_not_resume_without_its_engine(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    checkpoint.save_checkpoint(tmp_path / "checkpoint", model=model, optimizer=optimizer, step=1)
    (tmp_path / "checkpoint" / "sharded").mkdir()  # where each process's part of the optimizer state goes
    with pytest.raises(ValueError, match="resume it under the same engine"):
        checkpoint.load_checkpoint(tmp_path / "checkpoint", model=model, optimizer=optimizer)


def test_an_accelerate_config_that_overrides_the_scripts_accumulation_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # what accelerate launch sets from a config
    with pytest.raises(ValueError, match="accumulates 4 micro-batches per step, the script 2"):
        training.make_accelerator(8, 1.0, gradient_accumulation_steps=2)
    assert training.make_accelerator(8, 1.0, gradient_accumulation_steps=4).gradient_accumulation_steps == 4


def test_a_save_that_crashes_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_run(seed=0)
    checkpoint.save_checkpoint(tmp_path / "checkpoint", model=model, optimizer=optimizer, step=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_little(model, optimizer, scheduler)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", crash)  # the weights are written, the state is not
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path / "checkpoint", model=model, optimizer=optimizer, step=4)
    monkeypatch.undo()

    fresh, fresh_optimizer, _ = make_run(seed=1)
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint", model=fresh, optimizer=fresh_optimizer)["step"] == 1
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_a_crash_between_the_two_renames_still_loads_the_previous_checkpoint(tmp_path):
    model, optimizer, _ = make_run(seed=0)
    checkpoint.save_checkpoint(tmp_path / "checkpoint", model=model, step=2)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # as _swap_in leaves it mid-swap
    assert checkpoint.checkpoint_exists(tmp_path / "checkpoint")
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint", model=TiedModel())["step"] == 2
    assert not checkpoint.checkpoint_exists(tmp_path / "elsewhere")


def test_check_finite_names_the_step():
    training.check_finite(torch.tensor(1.5), step=1)
    with pytest.raises(RuntimeError, match=r"loss is nan at step 123; the last good checkpoint in runs/x"):
        training.check_finite(torch.tensor(float("nan")), 123, hint="the last good checkpoint in runs/x is intact")
    with pytest.raises(RuntimeError, match="loss is inf at step 4"):
        training.check_finite(float("inf"), 4)


def test_metrics_log_grows_columns_and_plots(tmp_path):
    logger = training.MetricsLogger(tmp_path)
    logger.log(1, loss=torch.tensor(2.0), lr=1e-3)
    logger.log(2, loss=1.5, val_loss=1.7)
    logger.log(2, loss=1.4)  # a resumed run repeating step 2: the later value counts
    metrics = training.read_metrics(tmp_path / "metrics.csv")
    assert metrics["loss"] == ([1, 2], [2.0, 1.4]) and metrics["val_loss"] == ([2], [1.7])

    png = training.plot_metrics(tmp_path / "metrics.csv", tmp_path / "plot.png", [["loss", "val_loss"], ["lr"]])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fresh_run_starts_its_metrics_anew_and_a_resumed_run_appends(tmp_path):
    training.MetricsLogger(tmp_path).log(150, kl=9.0)  # an earlier, longer run in the same folder
    training.MetricsLogger(tmp_path).log(1, kl=1.0)
    assert training.read_metrics(tmp_path / "metrics.csv") == {"kl": ([1], [1.0])}
    training.MetricsLogger(tmp_path, resume=True).log(2, kl=2.0)
    assert training.read_metrics(tmp_path / "metrics.csv") == {"kl": ([1, 2], [1.0, 2.0])}


def test_trackers_are_optional():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with=training.available_trackers(wanted=()))
    training.init_trackers(accelerator, "test", dict(lr=1e-3, sizes=[1, 2]))  # no tracker: no-op
    assert training.available_trackers(wanted=("no-such-tracker",)) is None
