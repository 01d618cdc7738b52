"""What the train_*.py scripts share: the Accelerator, the learning-rate schedule, metrics and
samples logs, plots, and `Run`, the scaffolding of a script's loop (resume, trackers, Ctrl-C,
resumable checkpoints, the final save, the plot), so that each script shows its own loop.

metrics.csv is in long format, one `step,key,value` row per metric: new keys need no new header,
and a resumed run just appends (readers keep the last value written for each step and key).
"""
import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (  # noqa: F401 (set_seed is re-exported)
    InitProcessGroupKwargs,
    extract_model_from_parallel,
    gather_object,
    set_seed,
)
from tqdm.auto import tqdm

from dataclasses import dataclass

from palm_rlhf.config import setting
from palm_rlhf.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint, weights_sharded, write_run_record
from palm_rlhf.model import PaLM, PaLMConfig

# set_seed(seed) is accelerate's: it seeds python, numpy and torch (and CUDA) in one call.


@dataclass
class RunConfig:
    """What every training script's run takes beside its own settings (each script's config extends it
    and sets out_dir's and checkpoint_every's defaults)."""

    mixed_precision: str | None = setting(None, "no, fp16 or bf16; by default what accelerate launch was given (--mixed_precision, its config), else no",
                                          choices=("no", "fp16", "bf16"))
    checkpoint_every: int = setting(100, "steps between resumable checkpoints", at_least=1)
    out_dir: str = setting("runs/run", "run folder: checkpoint/, final/, metrics.csv, plot")
    resume: bool = setting(False, "continue from out_dir/checkpoint")


def script_accelerator(cfg, micro_batch_size: int) -> Accelerator:
    """The Accelerator of a script's run (its precision, accumulation and clipping, trackers in
    out_dir), with every RNG seeded from cfg.seed."""
    accelerator = make_accelerator(micro_batch_size, cfg.max_grad_norm, gradient_accumulation_steps=getattr(cfg, "grad_accum", 1),
                                   mixed_precision=cfg.mixed_precision, log_with=available_trackers(), project_dir=str(cfg.out_dir))
    set_seed(cfg.seed)
    return accelerator


def load_lm(path: str, preset: str | None = None, needs_tokenizer: bool = True) -> PaLM:
    """The LM in `path` (train_lm.py's final folder) with its tokenizer; with `preset`, the path
    "none" gives a fresh PaLM of that size instead. A missing folder names the script that makes it."""
    if preset is not None and str(path).lower() == "none":
        return PaLM.from_config(PaLMConfig.from_name(preset))
    if not Path(path).is_dir():
        fresh = ", or pass --lm_checkpoint none to start from a fresh PaLM" if preset is not None else ""
        raise SystemExit(f"--lm_checkpoint {path}: no such folder; run train_lm.py first{fresh}")
    palm = PaLM.from_pretrained(path)
    if needs_tokenizer and palm.tokenizer is None:
        raise SystemExit(f"--lm_checkpoint {path}: its {palm.num_tokens}-token vocabulary came without a tokenizer.json; "
                         "save the LM with its tokenizer (palm.tokenizer = ...; palm.save(...))")
    return palm


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
    if not torch.cuda.is_available():  # DeepSpeed, when installed, would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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




# checks


def check_in_sync(accelerator, model) -> None:
    """Raises RuntimeError if the processes' copies of `model` differ (a sum of its parameters,
    gathered from every process), else prints that they agree. Call it on every process: with
    data parallelism every copy must stay the same, and a process that drifted is a silent bug. One
    process has nothing to compare, and says nothing."""
    if accelerator.num_processes == 1:
        return
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


# ---------------------------------------------------------------------------------------------------
# a script's run


class Run:
    """One script's run in cfg.out_dir, around the loop the script writes itself:

        run = Run(cfg, accelerator, name="lm", total=cfg.steps, model=palm, optimizer=optimizer)
        for step in run:                    # from the step a --resume starts at
            ...                             # the script's own work
            run.log(step + 1, loss=loss)
        run.finish(save_final)              # checkpoint, final model, run.json, plot

    It resumes from out_dir/checkpoint with --resume (the model, optimizer and scheduler, and what
    `extra_state()` saved, in `run.resumed`), starts the trackers and metrics.csv, saves a resumable
    checkpoint every cfg.checkpoint_every steps and at the step boundary after Ctrl-C or SIGTERM
    (then exits with status 130), and at the end checks that the processes' copies agree, saves the
    last checkpoint, calls `save_final(final_dir)` on every process, writes run.json and the plot,
    and ends the run (trackers closed, the process group destroyed)."""

    def __init__(self, cfg, accelerator, *, name: str, total: int, model, optimizer=None, scheduler=None,
                 extra_state=dict, checkpoint_config: dict | None = None, plot: list | None = None, unit: str = "step",
                 plot_file: str | None = None):
        """plot: panels of metrics.csv keys for out_dir/`plot_file` (default <name>.png); unit: what the
        loop counts, in its messages (steps; the RL scripts' iterations)."""
        self.cfg, self.accelerator, self.name, self.total, self.unit = cfg, accelerator, name, total, unit
        self.model, self.optimizer, self.scheduler, self.extra_state = model, optimizer, scheduler, extra_state
        self.checkpoint_config = checkpoint_config or dataclasses.asdict(cfg)
        self.plot_panels, self.plot_file = plot, plot_file or f"{name}.png"
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.start, self.resumed = 0, None
        if cfg.resume:
            if not checkpoint_exists(self.checkpoint_dir):
                raise SystemExit(f"--resume: no checkpoint in {self.checkpoint_dir}; start without --resume")
            state = load_checkpoint(self.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                    accelerator=accelerator)
            self.start, self.resumed = state["step"], state["extra"]
            accelerator.print(f"resumed at {unit} {self.start}")
        init_trackers(accelerator, f"palm_rlhf_{name}", dataclasses.asdict(cfg))
        self.metrics = MetricsLogger(self.out_dir, accelerator, resume=cfg.resume)
        self.stop = GracefulStop()
        self.progress = None

    def __iter__(self):
        self.progress = tqdm(range(self.start, self.total), initial=self.start, total=self.total,
                             desc=f"train_{self.name}", disable=not self.accelerator.is_main_process)
        for step in self.progress:
            yield step
            done = step + 1
            if self.stop.requested_on_any(self.accelerator):
                self.save(done)
                self.accelerator.print(f"\nstopped at {self.unit} {done}; checkpoint in {self.checkpoint_dir}; continue with --resume")
                raise SystemExit(130)
            if done % self.cfg.checkpoint_every == 0 and done < self.total:
                self.save(done)

    def log(self, step: int, **metrics) -> None:
        self.metrics.log(step, **metrics)

    def check_loss(self, loss, step: int) -> None:
        """Stops the run on a NaN or infinite loss (reduce it over processes first), the last good checkpoint intact."""
        check_finite(loss, step, hint=f"stopped; the last good checkpoint in {self.checkpoint_dir} is intact")

    def postfix(self, **values) -> None:
        """Shows `values` beside the progress bar."""
        if self.progress is not None:
            self.progress.set_postfix({k: f"{float(v):.3f}" for k, v in values.items()})

    def write(self, text: str) -> None:
        """Prints `text` on the main process without breaking the progress bar."""
        if self.accelerator.is_main_process:
            (self.progress.write if self.progress is not None else print)(text)

    def save(self, step: int) -> None:
        save_checkpoint(self.checkpoint_dir, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, step=step, extra=self.extra_state(), config=self.checkpoint_config)

    def finish(self, save_final) -> Path:
        """The end of the run; `save_final(directory)` runs on every process (sharded weights are
        gathered by all of them) and writes on the main one. Returns the final folder."""
        check_in_sync(self.accelerator, self.model)
        self.save(self.total)
        final = self.out_dir / "final"
        save_final(final)
        if self.accelerator.is_main_process:
            write_run_record(final, self.cfg)
            if self.plot_panels:
                plot_metrics(self.out_dir / "metrics.csv", self.out_dir / self.plot_file, self.plot_panels)
        self.accelerator.wait_for_everyone()  # all leave together, once the main process has written
        self.accelerator.end_training()
        return final
