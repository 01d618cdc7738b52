"""Runs a script under `accelerate launch` with N gloo processes on CPU, for the multi-process tests."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    # a fixed port (torchrun's 29500) would make two test runs on one machine wait for each other
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, *args, num_processes: int = 2, config_file=None, mixed_precision="no", timeout: int = 900):
    """`accelerate launch --multi_gpu --num_processes N script args` on CPU: `accelerate launch --cpu`
    starts one process unless MPI is set up, while the multi-GPU launcher (torchrun) with
    ACCELERATE_USE_CPU gives N gloo processes. With `config_file` (an engine's config, e.g.
    configs/deepspeed_zero3.yaml), that config instead, with N processes. `mixed_precision=None`
    leaves the precision to the config. Returns the CompletedProcess."""
    engine = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(num_processes),
              "--num_machines", "1", "--main_process_port", str(free_port()),
              *(["--mixed_precision", mixed_precision] if mixed_precision else []),
              "--dynamo_backend", "no", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    if not config_file:
        env["ACCELERATE_USE_CPU"] = "true"  # an engine's config runs as it would on GPUs (DeepSpeed refuses cpu)
    return subprocess.run(launch, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
