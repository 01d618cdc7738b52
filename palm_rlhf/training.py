"""Helpers shared by the train_*.py scripts: the Accelerator, config, schedule, checkpoints, metrics, plots.

Checkpoint layout (one resumable checkpoint per run, replaced as training goes):
    run_dir/checkpoint/model.safetensors   the unwrapped model's weights (shared tensors stored once)
    run_dir/checkpoint/config.json         the `config` dict given (pass the model's config so
                                           PaLM.from_pretrained can read the folder)
    run_dir/checkpoint/trainer_state.pt    step, extra, optimizer, scheduler, every process's RNGs;
                                           loads with torch.load(weights_only=True)
    run_dir/checkpoint/sharded/            ZeRO or FSDP only: each process's part of the weights and
                                           the optimizer state (Accelerate's save_state), which then
                                           replaces the optimizer in trainer_state.pt
A script saves its finished model the same way to run_dir/final. A save writes a temporary folder
and swaps it in only when complete, so a crash mid-save leaves the previous checkpoint readable.

metrics.csv is in long format, one `step,key,value` row per metric: new keys need no new header,
and a resumed run just appends (readers keep the last value written for each step and key).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (  # noqa: F401 (set_seed is re-exported)
    DistributedType,
    InitProcessGroupKwargs,
    extract_model_from_parallel,
    gather_object,
    set_seed,
)
from safetensors.torch import load_model

from palm_rlhf.palm import PaLM, save_state_dict, weights_sharded

# set_seed(seed) is accelerate's: it seeds python, numpy and torch (and CUDA) in one call.


# processes


def make_accelerator(micro_batch_size: int, max_grad_norm: float, **kwargs) -> Accelerator:
    """Accelerator(**kwargs), readied for DeepSpeed, which takes settings from its config that the
    scripts set: `micro_batch_size`, what one process feeds one forward and backward (Accelerate
    reads it from a prepared DataLoader, which the scripts do not use), the gradient accumulation
    steps given, and `max_grad_norm` (0: none), as DeepSpeed clips the gradients itself, one norm
    over all trained parameters, and a script's own clipping finds no gradients to clip.
    Without a GPU, DeepSpeed's processes talk over gloo: Accelerate picks the backend from the
    device and has none for DeepSpeed on CPU, so each process would count itself alone while ZeRO
    shards over all."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available():
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(**kwargs)
    asked = kwargs.get("gradient_accumulation_steps", 1)
    if accelerator.gradient_accumulation_steps != asked:  # a launcher config's value wins in Accelerate, silently
        raise ValueError(f"the accelerate config accumulates {accelerator.gradient_accumulation_steps} micro-batches per "
                         f"step, the script {asked}: remove gradient_accumulation_steps from the config (the scripts "
                         "that accumulate take --grad_accum)")
    if accelerator.state.deepspeed_plugin is not None:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
        config["gradient_clipping"] = max_grad_norm
    return accelerator


# configuration


def parse_config(config_class, argv=None):
    """An instance of the dataclass `config_class` from command-line arguments.

    Every field becomes `--name` (underscores stay underscores) with its default and the help text
    of `field(metadata={"help": ...})`; bools become `--name/--no-name`; `Optional[T]` fields also
    accept `none`. argparse reports unknown arguments and values of the wrong type.
    """
    parser = argparse.ArgumentParser(
        description=(config_class.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    types = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        options = dict(default=default, help=field.metadata.get("help", " "))
        if default is dataclasses.MISSING:
            options = dict(required=True, help=options["help"])
        field_type = types[field.name]
        if field_type is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _argument_parser(field_type, field.name)
        parser.add_argument(f"--{field.name}", **options)
    return config_class(**vars(parser.parse_args(argv)))


def _argument_parser(field_type, name):
    """A function from a command-line string to `field_type` (int, float, str, or Optional of one)."""
    arguments = [t for t in typing.get_args(field_type) if t is not type(None)]
    is_union = typing.get_origin(field_type) in (typing.Union, types.UnionType)
    is_optional = is_union and len(arguments) == 1
    base_type = arguments[0] if is_optional else field_type
    if base_type not in (int, float, str):
        raise TypeError(f"config field {name!r}: type {field_type} is not supported on the command line")

    def parse(text):
        if is_optional and text.lower() == "none":
            return None
        return base_type(text)

    parse.__name__ = base_type.__name__  # argparse names the type in its error message
    return parse


# learning-rate schedule


def lr_lambda_warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """A multiplier for torch.optim.lr_scheduler.LambdaLR: linear warmup, then cosine decay.

    Rises linearly to 1 over `warmup_steps`, then follows half a cosine down to `min_ratio` at
    `total_steps`, and stays there.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


# checkpoints


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return dict(
        python=random.getstate(),
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses; lists load
        numpy=[numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory, *, accelerator=None, model, optimizer=None, scheduler=None,
                    step: int, extra: dict = None, config: dict = None) -> Path:
    """Save a resumable checkpoint to `directory` (layout in the module docstring).

    Call it on every process: each contributes its RNG state, only the main process writes, and
    all return once the checkpoint is complete. `accelerator=None` means a single process.
    The weights are gathered whole (FSDP, ZeRO-3). The optimizer state is the main process's, the
    whole of it for one process or DDP; where each process holds only its part (ZeRO, FSDP), every
    process writes its part with Accelerate's save_state to directory/sharded instead.
    """
    directory = Path(directory)
    state = accelerator or PartialState()
    rng_states = gather_object([_rng_state()])  # one per process, so each resumes its own stream
    weights = full_state_dict(accelerator, model)
    temporary = directory.with_name(directory.name + ".tmp")
    sharded = optimizer_sharded(accelerator)
    if state.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        (temporary / "sharded" if sharded else temporary).mkdir(parents=True)
    if sharded:  # the folder exists before any process writes its part, and moves only once all have
        state.wait_for_everyone()
        accelerator.save_state(str(temporary / "sharded"))
        state.wait_for_everyone()
    if state.is_main_process:
        save_state_dict(weights, temporary / "model.safetensors", extract_model_from_parallel(model))
        (temporary / "config.json").write_text(json.dumps(config or {}, indent=2, default=str))
        trainer_state = dict(
            step=step,
            extra=extra or {},
            optimizer=optimizer.state_dict() if optimizer and not sharded else None,
            scheduler=scheduler.state_dict() if scheduler else None,
            rng=rng_states,
        )
        torch.save(trainer_state, temporary / "trainer_state.pt")
        _swap_in(temporary, directory)
    state.wait_for_everyone()
    return directory


def optimizer_sharded(accelerator) -> bool:
    """Whether each process holds only its part of the optimizer state (DeepSpeed ZeRO, FSDP)."""
    return accelerator is not None and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def full_state_dict(accelerator, model) -> dict:
    """The unwrapped model's whole state dict. Call it on every process: under FSDP or ZeRO-3 it
    gathers the shards (Accelerate's get_state_dict), so only the main process's copy is complete."""
    if accelerator is None:
        return extract_model_from_parallel(model).state_dict()
    return accelerator.get_state_dict(model)


def whole_copy(accelerator, prepared, palm: PaLM) -> PaLM:
    """A copy of `palm` (the model `prepared` by Accelerate, or the PaLM inside it) that holds all its
    weights, to merge, sample from or save on one process. Sharded weights (ZeRO-3, FSDP) are
    gathered: call it on every process then; the main process's copy is the whole one."""
    if not weights_sharded(palm):
        return copy.deepcopy(palm)
    weights = full_state_dict(accelerator, prepared)
    prefix = next(name for name, module in extract_model_from_parallel(prepared).named_modules() if module is palm)
    prefix = prefix + "." if prefix else ""
    whole = PaLM.from_config(palm.config)
    whole.tokenizer = palm.tokenizer
    if accelerator.is_main_process:
        whole.load_state_dict({name.removeprefix(prefix): value for name, value in weights.items()
                               if name.startswith(prefix)})
    return whole


def _swap_in(temporary: Path, directory: Path) -> None:
    # a folder cannot be renamed over a non-empty one, so the old one steps aside first;
    # load_checkpoint reads the aside copy if a crash falls between the two renames
    aside = directory.with_name(directory.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if directory.exists():
        os.replace(directory, aside)
    os.replace(temporary, directory)
    shutil.rmtree(aside, ignore_errors=True)


def checkpoint_exists(directory) -> bool:
    """Whether `directory` (or the copy a crash mid-save left aside) holds a complete checkpoint."""
    return _readable_checkpoint(Path(directory)) is not None


def _readable_checkpoint(directory: Path):
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    return None


def load_checkpoint(directory, *, model, optimizer=None, scheduler=None, accelerator=None) -> dict:
    """Restore a checkpoint written by save_checkpoint; returns dict(step, extra).

    Loads the weights into the unwrapped model, the optimizer and scheduler states when given, and
    this process's RNG states (process i takes the i-th saved, modulo the saved count). A checkpoint
    whose optimizer state was saved in parts (ZeRO, FSDP) needs `accelerator`, after `prepare`:
    Accelerate's load_state gives each process its part of the weights and the optimizer state.
    """
    found = _readable_checkpoint(Path(directory))
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    trainer_state = torch.load(found / "trainer_state.pt", map_location="cpu", weights_only=True)
    if (found / "sharded").is_dir():
        if not optimizer_sharded(accelerator):
            raise ValueError(f"{found} holds its optimizer state in parts (ZeRO or FSDP): resume it under the same "
                             "engine and number of processes, loading after accelerator.prepare")
        accelerator.load_state(str(found / "sharded"))
    else:
        load_model(extract_model_from_parallel(model), str(found / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    rng_states = trainer_state["rng"]
    _set_rng_state(rng_states[PartialState().process_index % len(rng_states)])
    return dict(step=trainer_state["step"], extra=trainer_state["extra"])


def check_in_sync(accelerator, model) -> None:
    """Raises RuntimeError if the processes' copies of `model` differ (a sum of its parameters,
    gathered from every process), else prints that they agree. Call it on every process: with
    data parallelism every copy must stay the same, and a process that drifted is a silent bug."""
    unwrapped = extract_model_from_parallel(model)
    if weights_sharded(unwrapped):  # no process holds a whole copy to compare
        accelerator.print(f"weights sharded across {accelerator.num_processes} process(es)")
        return
    checksum = sum(float(p.detach().double().sum()) for p in unwrapped.parameters())
    checksums = gather_object([checksum])
    if len(set(checksums)) != 1:
        raise RuntimeError(f"parameters differ across processes: {checksums}")
    accelerator.print(f"parameters identical across {accelerator.num_processes} process(es)")


def check_finite(loss, step: int, hint: str = None) -> None:
    """Raise RuntimeError if `loss` is nan or inf: "loss is nan at step 123; <hint>".

    With several processes, reduce the loss first (accelerator.reduce) so all raise together.
    """
    value = float(loss)
    if not math.isfinite(value):
        message = f"loss is {value} at step {step}"
        raise RuntimeError(f"{message}; {hint}" if hint else message)


class GracefulStop:
    """Ctrl-C or SIGTERM asks the training loop to stop at the next step boundary, where the state
    is consistent, so the checkpoint it saves then loses nothing. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._request)
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def requested_on_any(self, accelerator) -> bool:
        """Whether any process was asked to stop; all processes get the same answer, so they stop together."""
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)


def write_run_record(directory, config) -> Path:
    """directory/run.json: the command that made the folder's model and its whole config, so that a
    figure measured on the model later (evaluate.py) can name exactly what made it."""
    command = " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, *sys.argv])
    path = Path(directory) / "run.json"
    path.write_text(json.dumps(dict(command=command, config=dataclasses.asdict(config)), indent=2, default=str))
    return path


# metrics


class MetricsLogger:
    """Appends `step,key,value` rows to run_dir/metrics.csv and forwards to accelerator.log.

    A fresh run starts the file anew (an earlier run's rows in the same folder would otherwise mix
    with its own); `resume=True` appends to it. Only the main process writes. Tensors and numpy
    scalars are logged as plain floats.
    """

    def __init__(self, run_dir, accelerator=None, resume: bool = False):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.csv"
        self.is_main = accelerator.is_main_process if accelerator else PartialState().is_main_process
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not (resume and self.path.exists()):
                self.path.write_text("step,key,value\n")

    def log(self, step: int, **metrics) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        if self.is_main:
            with open(self.path, "a") as file:
                file.writelines(f"{step},{key},{value!r}\n" for key, value in values.items())
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(values, step=step)


class SampleLogger:
    """Appends every iteration's prompts and responses, from every process, to run_dir/samples.jsonl,
    one {"iteration", "prompt", "response"} object a line: what the logged means were taken over, to
    read or to score again. A fresh run starts the file anew; `resume=True` appends to it."""

    def __init__(self, run_dir, accelerator, resume: bool = False):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "samples.jsonl"
        if accelerator.is_main_process and not (resume and self.path.exists()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, iteration: int, prompts: list, responses: list) -> None:
        rows = gather_object([dict(iteration=iteration, prompt=p, response=r) for p, r in zip(prompts, responses)])
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as file:
                file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_metrics(csv_path) -> dict:
    """metrics.csv as {key: (steps, values)} sorted by step, keeping the last value of a repeat."""
    by_key = {}
    with open(csv_path) as file:
        next(file)  # header
        for line in file:
            step, key, value = line.rstrip("\n").split(",")
            by_key.setdefault(key, {})[int(step)] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def available_trackers(wanted=("tensorboard", "wandb")):
    """The trackers in `wanted` whose package is installed, or None if none is, for
    Accelerator(log_with=available_trackers(), project_dir=run_dir)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    installed = dict(tensorboard=is_tensorboard_available(), wandb=is_wandb_available())
    return [name for name in wanted if installed.get(name)] or None


def init_trackers(accelerator, project: str, config: dict) -> None:
    """Start the trackers the Accelerator was built with (`log_with`); does nothing if none.

    Values other than int, float, str and bool are logged as strings: tensorboard's hparams
    accept nothing else.
    """
    if not accelerator.log_with:
        return
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    accelerator.init_trackers(project, config=flat)


def plot_metrics(csv_path, png_path, keys_by_panel) -> Path:
    """Plot metrics.csv to a PNG, one panel per group of keys, x = step.

    `keys_by_panel` is a list of key lists, e.g. [["loss", "val_loss"], ["lr"]]; keys never
    logged are left out of their panel.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # draw to a file; no display needed
    import matplotlib.pyplot as plt

    metrics = read_metrics(csv_path)
    figure, axes = plt.subplots(len(keys_by_panel), 1, figsize=(7, 2.6 * len(keys_by_panel)),
                                sharex=True, squeeze=False)
    for axis, keys in zip(axes[:, 0], keys_by_panel):
        for key in keys:
            if key in metrics:
                axis.plot(*metrics[key], label=key)
        axis.legend(loc="best", fontsize="small")
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)
