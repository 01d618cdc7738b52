"""Every save and load: PaLM weights with their config and tokenizer, reward models' scopes and
heads beside the base they were trained on, resumable training state, and the gathering of weights
sharded over processes (FSDP2, ZeRO-3) before any of it.

A model folder (`PaLM.save`, `RewardModel.save`, a script's run_dir/final):
    model.safetensors   the weights; a tensor held under several names (the tied embedding) once
    config.json         the model's config, what `from_pretrained` builds from
    tokenizer.json      the tokenizer (a folder without one speaks bytes)
    run.json            written by the scripts: the command and the whole config that made it
A reward model's folder holds reward.safetensors (head, segment embeddings, scope), base/ (the base
PaLM) and config.json with the base's checksum, which loading onto a shared base checks.

A resumable checkpoint (one per run, replaced as training goes):
    run_dir/checkpoint/model.safetensors   the unwrapped model's weights
    run_dir/checkpoint/config.json         the `config` dict given
    run_dir/checkpoint/trainer_state.pt    step, extra, optimizer, scheduler, every process's RNGs;
                                           loads with torch.load(weights_only=True)
    run_dir/checkpoint/sharded/            ZeRO or FSDP only: each process's part of the weights and
                                           the optimizer state (Accelerate's save_state), which then
                                           replaces the optimizer in trainer_state.pt
A save writes a temporary folder and swaps it in only when complete, so a crash mid-save leaves the
previous checkpoint readable.
"""
import copy
import dataclasses
import hashlib
import inspect
import json
import os
import random
import shlex
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, extract_model_from_parallel, gather_object
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.distributed.tensor import DTensor

from palm_rlhf.tokenizer import TOKENIZER_FILE, check_vocab_size, load_tokenizer

# ---------------------------------------------------------------------------------------------------
# PaLM weights


def save_palm(palm, path, state_dict: dict | None = None):
    """`palm`'s safetensors weights with the config in their metadata. A directory gets model.safetensors,
    a readable config.json (what `from_pretrained` reads) and the tokenizer's tokenizer.json; a
    file path gets one file.
    `state_dict`: the weights to write instead of this module's own, e.g. the full state dict
    that `accelerator.get_state_dict` gathers from the shards of FSDP or ZeRO-3."""
    path = Path(path)
    config_json = json.dumps(asdict(palm.config))
    if path.suffix not in (".safetensors", ".pt", ".bin"):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(palm.config), indent=2))
        if palm.tokenizer is not None:
            palm.tokenizer.save(path)
        path = path / "model.safetensors"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        save_model(palm, str(path), metadata={"palm_config": config_json})
    else:
        save_state_dict(state_dict, path, palm, metadata={"palm_config": config_json})


def load_palm_weights(palm, path, strict: bool = True):
    """Loads weights saved by `save` into this model; a checkpoint of another shape fails with a
    message naming each mismatch."""
    path = weights_path(path)
    saved = read_saved_config(path)
    if saved is not None:
        mine = asdict(palm.config)
        mismatched = [f"{k}: checkpoint {saved[k]!r}, model {mine[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != mine[k]]
        if saved.get("finetune_scopes", {}) != mine["finetune_scopes"]:
            mismatched.append(f"finetune_scopes: checkpoint {saved.get('finetune_scopes')}, model {mine['finetune_scopes']}")
        if mismatched:
            raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(mismatched))
    with safe_open(str(path), "pt") as f:
        own = palm.state_dict()
        bad = [f"{k}: checkpoint {tuple(f.get_slice(k).get_shape())}, model {tuple(own[k].shape)}"
               for k in f.keys() if k in own and tuple(f.get_slice(k).get_shape()) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(bad))
    load_model(palm, str(path), strict=strict, device=str(palm.device))
    return palm


def palm_from_pretrained(cls, path, **overrides):
    """Builds the model (of class `cls`) a checkpoint describes, from its config.json or metadata,
    and loads it, with the tokenizer saved beside it (tokenizer.json; a folder without one speaks bytes)."""
    weights = weights_path(path)
    saved = read_saved_config(weights)
    if saved is None:
        raise ValueError(f"{path} holds no PaLM config; was it written by PaLM.save?")
    known = set(inspect.signature(cls.__init__).parameters)
    model = cls(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
    if (weights.parent / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer(weights.parent / TOKENIZER_FILE)
        check_vocab_size(tokenizer, model.num_tokens, where=f"the model in {weights.parent}")
        model.tokenizer = tokenizer
    return load_palm_weights(model, path)



def save_state_dict(state_dict: dict, path, module: nn.Module, metadata: dict | None = None):
    """Writes `module`'s state dict as safetensors with each tensor that `module` holds under several
    names (the tied embedding) stored once, under its first name, as safetensors' save_model does;
    its load_model fills in the other names. Which names are one tensor is read from the module, not
    from the state dict's storage: a full state dict gathered from FSDP2 shards holds the tied
    embedding as two separate copies, which load_model would reject as an unexpected key."""
    repeated = repeated_names(module)
    unique = {name: tensor.detach().contiguous() for name, tensor in state_dict.items() if name not in repeated}
    save_file(unique, str(path), metadata=metadata)


def repeated_names(module: nn.Module) -> set[str]:
    """The names under which `module` holds a parameter or buffer that an earlier name already holds."""
    seen, repeated = set(), set()
    for name, tensor in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            repeated.add(name)
        seen.add(id(tensor))
    return repeated


SHAPE_FIELDS = ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "tie_embedding")


def weights_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def read_saved_config(path: Path) -> dict | None:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "palm_config" in metadata:
        return json.loads(metadata["palm_config"])
    config_file = path.parent / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else None


def weights_sharded(module: nn.Module) -> bool:
    """Whether any of `module`'s weights are split over processes: FSDP2 makes them DTensors, ZeRO-3
    partitions them (and marks each with a `ds_id`)."""
    return any(isinstance(weight, DTensor) or hasattr(weight, "ds_id") for weight in module.parameters())


# ---------------------------------------------------------------------------------------------------
# reward models: their own tensors, beside the base they were trained on


def base_checksum(palm) -> str:
    """SHA-256 of the base weights (every tensor outside the fine-tune scopes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(palm.state_dict().items()):
        if not name.startswith("finetune_modules."):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_palm(palm):
    """A copy of `palm` without its fine-tune scopes (on CPU), for saving the base alone."""
    base = type(palm).from_config(replace(palm.config, finetune_scopes={}))
    state = {k: v for k, v in palm.state_dict().items() if not k.startswith("finetune_modules.")}
    base.load_state_dict(state)
    base.tokenizer = palm.tokenizer
    return base


def reward_state_dict(model) -> dict:
    """A reward model's own tensors: head, segment embeddings and its scope. (With the whole PaLM
    fine-tuned, the tuned PaLM is the base that `save_reward_model` writes beside them.)"""
    scope = f"palm.finetune_modules.{model.scope}."
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
            if not name.startswith("palm.") or (model.scope and name.startswith(scope))}


def save_reward_model(model, directory) -> Path:
    """directory/reward.safetensors (head, segment embeddings, scope), directory/base (the base PaLM,
    loadable with PaLM.from_pretrained) and directory/config.json (with the base's checksum)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_palm(model.palm).save(directory / "base")
    save_file(reward_state_dict(model), str(directory / "reward.safetensors"))
    config = dict(model.args, base_checksum=base_checksum(model.palm))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_reward_model(cls, directory, palm=None, scope: str | None = None, palm_class=None):
    """A saved reward model (of class `cls`), in eval mode. With `palm`, its saved scope and head go
    onto that PaLM after checking the PaLM's base weights are the ones it was trained on; without,
    the base saved beside it is built (of class `palm_class`). `scope`: the name its scope takes on
    `palm` (default the saved one), so that several reward models can share one base."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no reward model at {directory} (expected config.json, written by RewardModel.save)")
    config = json.loads((directory / "config.json").read_text())
    config.setdefault("pool", "eos")  # saved before `pool` existed, when the EOS was the only read-out
    if palm is None:
        palm = palm_class.from_pretrained(directory / "base")
    elif base_checksum(palm) != config["base_checksum"]:
        raise ValueError(
            f"the reward model in {directory} was trained on another base PaLM (base weights checksum "
            f"{config['base_checksum'][:12]}..., the given PaLM's {base_checksum(palm)[:12]}...); pass the "
            "PaLM it was trained on, or palm=None to load the base saved with it"
        )
    saved_scope = config["reward_lora_scope"]
    if scope is not None:
        config["reward_lora_scope"] = scope
    model = cls(palm, **{k: v for k, v in config.items() if k != "base_checksum"})
    saved = load_file(str(directory / "reward.safetensors"), device=str(palm.device))
    old, new = f"palm.finetune_modules.{saved_scope}.", f"palm.finetune_modules.{config['reward_lora_scope']}."
    saved = {new + k[len(old):] if k.startswith(old) else k: v for k, v in saved.items()}
    missing = sorted(set(reward_state_dict(model)) - set(saved))
    if missing:
        raise ValueError(f"{directory / 'reward.safetensors'} lacks {missing[:5]}")
    model.load_state_dict(saved, strict=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# resumable training state


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


def whole_copy(accelerator, prepared, palm):
    """A copy of `palm` (the model `prepared` by Accelerate, or the PaLM inside it) that holds all its
    weights, to merge, sample from or save on one process. Sharded weights (ZeRO-3, FSDP) are
    gathered: call it on every process then; the main process's copy is the whole one."""
    if not weights_sharded(palm):
        return copy.deepcopy(palm)
    weights = full_state_dict(accelerator, prepared)
    prefix = next(name for name, module in extract_model_from_parallel(prepared).named_modules() if module is palm)
    prefix = prefix + "." if prefix else ""
    whole = type(palm).from_config(palm.config)
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


def write_run_record(directory, config) -> Path:
    """directory/run.json: the command that made the folder's model and its whole config, so that a
    figure measured on the model later (evaluate.py) can name exactly what made it."""
    command = " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, *sys.argv])
    path = Path(directory) / "run.json"
    path.write_text(json.dumps(dict(command=command, config=dataclasses.asdict(config)), indent=2, default=str))
    return path
