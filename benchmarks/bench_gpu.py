"""Training MFU, decoding against the memory-bandwidth bound, one PPO and one GRPO iteration: on a GPU.

    python benchmarks/bench_gpu.py                              # presets medium and large, bf16, the visible GPU
    python benchmarks/bench_gpu.py --presets large --compile    # the training step under torch.compile
    python benchmarks/bench_gpu.py --device cpu --peak_flops 1e12 --bandwidth 2e10 --presets tiny  # the code path on CPU

Per preset, in bf16 (--dtype fp32: full precision):
- train: forward + backward + AdamW on --batch x --seq_len tokens, every weight trained, under bf16
  autocast with fp32 weights. MFU = model FLOPs per token x tokens/s / the device's peak dense bf16
  FLOP/s, with the model FLOPs of PaLM's appendix B (`train_flops_per_token`).
- decode_b{B}: --new_tokens tokens sampled after a --prompt_len prompt at each batch of --gen_batches
  (temperature 1, no EOS), weights cast to bf16, KV cache; tokens/s against the bound that the memory
  bandwidth sets (`decode_bound_tokens_per_s`).
- ppo, grpo: the rollout (sampling, scoring, the log-prob and value passes) and the update (one
  epoch of the clipped losses in minibatches of --rl_minibatch) of one iteration, on LoRA scopes of
  the frozen base under bf16 autocast; --rl_batch responses (GRPO: in groups of --group_size); the
  reward is the count of one byte, so no reward model runs and every response runs to its length.
Peak memory: torch.cuda.max_memory_allocated (on CPU the process's peak RSS, imports included).
Each figure is the median of --repeats timed runs after a warm-up, in a fresh subprocess.

palm-rlhf-pytorch 0.8.0 (`pip install palm-rlhf-pytorch==0.8.0`), when installed, is timed beside
ours for train and decode: the same PaLM, whose sampler keeps no KV cache (it re-reads the whole
prefix every step, so the bound, which counts one pass over the cache, flatters it less and less).

--compile runs the training step under torch.compile and reports the compile time (the first step's
time less a compiled step's). The decoding step is not compiled: the KV cache's length is a Python
int, which dynamo specialises on, so every new length recompiles until dynamo's recompile limit and
then runs eager; a compiled (or CUDA-graphed) decoding step needs a cache of static shape.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_palm import PALM_RLHF_PYTORCH, build, generate_fn, installed, sync

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.model import PRESETS
from palm_rlhf.tokenizer import NUM_TOKENS

# device name (a part of torch.cuda.get_device_name, first match wins) -> (peak dense bf16 FLOP/s,
# memory bandwidth in bytes/s), from NVIDIA's datasheets; the PCIe H100 is listed before "H100" (SXM)
DEVICES = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEERS = {PALM_RLHF_PYTORCH: ("train", "decode")}  # peer -> tasks it runs


# ---------------------------------------------------------------------------------------------------
# the arithmetic


def device_peak(name: str, peak_flops: float | None = None, bandwidth: float | None = None) -> tuple[float, float]:
    """(peak dense bf16 FLOP/s, memory bytes/s) of the device `name` (as torch.cuda.get_device_name
    gives it), each replaced by its argument when one is given; an unknown device needs both."""
    known = next((spec for key, spec in DEVICES.items() if key in name), None)
    if known is None and (peak_flops is None or bandwidth is None):
        raise ValueError(f"no peak FLOP/s and bandwidth known for {name!r} (known: {list(DEVICES)}): "
                         "pass --peak_flops and --bandwidth")
    return (known[0] if peak_flops is None else peak_flops, known[1] if bandwidth is None else bandwidth)


def matmul_params(config: PaLMConfig) -> int:
    """N: the weights that multiply an activation once per token. Per block the fused input projection
    (h query heads, the one key and value head, SwiGLU's value and gate), the attention output and the
    feed-forward output; then the output projection (the tied embedding, counted once: the embedding
    lookup is no matmul, nor are the norms)."""
    dim, ff, attn = config.dim, config.ff_mult * config.dim, config.heads * config.dim_head
    block = dim * (attn + 2 * config.dim_head + 2 * ff) + attn * dim + ff * dim
    return config.depth * block + dim * config.num_tokens


def train_flops_per_token(config: PaLMConfig, seq_len: int) -> int:
    """Model FLOPs of one training token, 6N + 12 L H Q T (Chowdhery et al. 2022, appendix B): a
    forward pass is 2 FLOPs per weight and, per layer and head, 2 Q T for q k^T and 2 Q T for the
    weighted sum of v over T keys; backward is twice the forward. The attention term counts the whole
    T x T score matrix, as the paper does, although a causal kernel computes about half of it."""
    return 6 * matmul_params(config) + 12 * config.depth * config.heads * config.dim_head * seq_len


def kv_bytes_per_position(config: PaLMConfig, bytes_per_value: int) -> int:
    """The KV cache of one position of one sequence: a key and a value of dim_head in every layer,
    for the one key/value head of multi-query attention (multi-head attention would hold h of each)."""
    return 2 * config.depth * config.dim_head * bytes_per_value


def decode_bytes(weight_bytes: int, kv_per_position: int, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes read from memory to sample new_tokens in each of `batch` rows: each of the new_tokens
    forward passes (the prompt's, then one per sampled token) reads every weight once and each row's
    cache up to its position,
        new_tokens * weight_bytes + batch * kv_per_position * sum_{t < new_tokens} (prompt_len + t).
    Activations, logits and the cache writes are left out: small beside these at batch <= 64."""
    positions = new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2
    return new_tokens * weight_bytes + batch * kv_per_position * positions


def decode_bound_tokens_per_s(weight_bytes: int, kv_per_position: int, batch: int, prompt_len: int,
                              new_tokens: int, bandwidth: float) -> float:
    """The most tokens/s that decoding can sample when it is bound by memory bandwidth (bytes/s):
    batch * new_tokens / (decode_bytes(...) / bandwidth)."""
    return batch * new_tokens * bandwidth / decode_bytes(weight_bytes, kv_per_position, batch, prompt_len, new_tokens)


# ---------------------------------------------------------------------------------------------------
# the measurements, each in its own process


def palm_args(args, preset: str) -> argparse.Namespace:
    """bench_palm's build() and generate_fn() read the model's shape and the lengths from one namespace."""
    return argparse.Namespace(**vars(args), **PRESETS[preset], num_tokens=NUM_TOKENS)


def first_and_median(step, repeats: int) -> tuple[float, float]:
    """Seconds of a first call to `step` (the warm-up; with torch.compile, the compilation) and the
    median of `repeats` more."""
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def measure_train(impl: str, preset: str, args, device) -> dict:
    torch.manual_seed(0)
    model = build(impl, palm_args(args, preset)).to(device)
    if args.compile:
        model.compile()  # in place, so that the model's own calls of itself run compiled too
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(batch, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    first, seconds = first_and_median(step, args.repeats)
    return dict(tokens_per_s=args.batch * args.seq_len / seconds, compile_s=first - seconds if args.compile else None)


def measure_decode(impl: str, preset: str, batch: int, args, device) -> dict:
    torch.manual_seed(0)
    model = build(impl, palm_args(args, preset)).to(device, DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, 256, (batch, args.prompt_len), device=device)
    generate = generate_fn(impl, model, palm_args(args, preset), prompt)

    def step():
        with torch.no_grad():
            generate()
        sync(device)

    _, seconds = first_and_median(step, args.repeats)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight once
    return dict(tokens_per_s=batch * args.new_tokens / seconds, weight_bytes=weight_bytes)


def rl_trainer(method: str, preset: str, args, device):
    """-> (our PPO or GRPO trainer on a fresh `preset` PaLM, prompts per iteration, responses per prompt)."""
    from bench_ppo import NoEOS, count_byte

    from palm_rlhf.grpo import GRPOTrainer
    from palm_rlhf.ppo import RLHFTrainer

    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name(preset))
    common = dict(palm=palm, reward_fn=count_byte, prompt_token_ids=torch.randint(0, 256, (8, args.prompt_len)),
                  tokenizer=NoEOS(), epochs=1, minibatch_size=args.rl_minibatch, max_seq_len=args.prompt_len + args.new_tokens,
                  accelerate_kwargs=dict(mixed_precision="bf16" if args.dtype == "bf16" else "no", cpu=device.type == "cpu"))
    if method == "ppo":
        return RLHFTrainer(**common, rollout_batch_size=args.rl_batch), args.rl_batch, 1
    # GRPO as DeepSeekMath runs it: the std-normalised advantage, the k3 KL in the loss
    return (GRPOTrainer(**common, group_size=args.group_size, prompts_per_step=args.rl_batch // args.group_size,
                        estimator="grpo", beta=0.04, kl_in="loss"), args.rl_batch // args.group_size, args.group_size)


def measure_rl(method: str, preset: str, args, device) -> dict:
    """One iteration, as `step` runs it (less its reduction of the diagnostics over processes), with
    the rollout and the update timed apart."""
    trainer, num_prompts, group = rl_trainer(method, preset, args, device)
    max_seq_len = args.prompt_len + args.new_tokens

    def iteration():
        prompts, generator = trainer.draw_prompts(num_prompts)
        start = time.perf_counter()
        rollout, _ = trainer.rollout(prompts, max_seq_len, generator=generator)
        sync(device)
        sampled = time.perf_counter()
        trainer.learn(rollout)
        sync(device)
        return sampled - start, time.perf_counter() - sampled

    iteration()  # warm-up
    rollout_s, learn_s = (statistics.median(t) for t in zip(*(iteration() for _ in range(args.repeats))))
    tokens = num_prompts * group * args.new_tokens
    return dict(tokens_per_s=tokens / (rollout_s + learn_s), rollout_s=rollout_s, learn_s=learn_s)


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(impl: str, preset: str, task: str, args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if task == "train":
        result = measure_train(impl, preset, args, device)
    elif task.startswith("decode_b"):
        result = measure_decode(impl, preset, int(task.removeprefix("decode_b")), args, device)
    else:
        result = measure_rl(task, preset, args, device)
    return dict(result, peak_mb=peak_mb(device))


# ---------------------------------------------------------------------------------------------------
# the table


def summarize(preset: str, task: str, impl: str, result: dict, args, peak_flops: float, bandwidth: float) -> dict:
    """One row of the table: tokens/s, its bound where there is one, and the share of it reached
    (MFU for training, the fraction of the bandwidth bound for decoding)."""
    config = PaLMConfig.from_name(preset)
    row = dict(preset=preset, task=task, impl=impl, tokens_per_s=result["tokens_per_s"], bound=None, share=None,
               peak_mb=result["peak_mb"], note="")
    if task == "train":
        row["share"] = train_flops_per_token(config, args.seq_len) * result["tokens_per_s"] / peak_flops
        row["note"] = "MFU" + ("" if result["compile_s"] is None else f"; compiled in {result['compile_s']:.1f} s")
    elif task.startswith("decode_b"):
        kv = kv_bytes_per_position(config, DTYPES[args.dtype].itemsize)
        row["bound"] = decode_bound_tokens_per_s(result["weight_bytes"], kv, int(task.removeprefix("decode_b")),
                                                 args.prompt_len, args.new_tokens, bandwidth)
        row["share"] = result["tokens_per_s"] / row["bound"]
        row["note"] = "of the bandwidth bound"
    else:
        rollout_s, learn_s = result["rollout_s"], result["learn_s"]
        row["note"] = f"{rollout_s + learn_s:.3f} s/iteration: rollout {rollout_s:.3f}, update {learn_s:.3f}"
    return row


TASKS = ("train", "decode", "ppo", "grpo")


def tasks(args) -> list[str]:
    """--tasks in TASKS' order, decode as one task per batch size."""
    return [t for task in TASKS if task in args.tasks
            for t in ([f"decode_b{b}" for b in args.gen_batches] if task == "decode" else [task])]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=["medium", "large"], help="model sizes")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--peak_flops", type=float, help="peak dense bf16 FLOP/s (default: the device's, from DEVICES)")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in bytes/s (default: the device's, from DEVICES)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="bf16: autocast (training, RL), bf16 weights (decoding)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--seq_len", type=int, default=2048, help="training sequence length")
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt length for decoding and RL")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens sampled per sequence for decoding and RL")
    parser.add_argument("--gen_batches", type=int, nargs="+", default=[1, 8, 64], help="decoding batch sizes")
    parser.add_argument("--rl_batch", type=int, default=64, help="responses per RL iteration")
    parser.add_argument("--group_size", type=int, default=8, help="GRPO responses per prompt")
    parser.add_argument("--rl_minibatch", type=int, default=16, help="responses per RL minibatch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step; its compile time is reported")
    parser.add_argument("--no_peers", action="store_true", help="time ours alone, even if palm-rlhf-pytorch is installed")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "PRESET", "TASK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_in_subprocess(impl: str, preset: str, task: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", impl, preset, task],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {preset} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    """Prints the table; returns its rows."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))
        return []
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak_flops, bandwidth = device_peak(name, args.peak_flops, args.bandwidth)
    peers = [] if args.no_peers else [peer for peer in PEERS if installed(peer)]
    print(f"{name}: peak {peak_flops / 1e12:.0f} TFLOP/s bf16, {bandwidth / 1e12:.2f} TB/s; {args.dtype}; train "
          f"{args.batch} x {args.seq_len}{' (torch.compile)' if args.compile else ''}; decode and RL {args.new_tokens} "
          f"new tokens after {args.prompt_len}")
    print(f"{'preset':<8}{'task':<11}{'impl':<19}{'tokens/s':>12}{'bound':>12}{'share':>8}{'peak MB':>10}  note")
    rows = []
    for preset in args.presets:
        for task in tasks(args):
            for impl in ["ours"] + [peer for peer in peers if task.split("_b")[0] in PEERS[peer]]:
                row = summarize(preset, task, impl, run_in_subprocess(impl, preset, task, argv), args, peak_flops, bandwidth)
                bound = "" if row["bound"] is None else f"{row['bound']:.1f}"
                share = "" if row["share"] is None else f"{row['share']:.1%}"
                print(f"{preset:<8}{task:<11}{impl:<19}{row['tokens_per_s']:>12.1f}{bound:>12}{share:>8}"
                      f"{row['peak_mb']:>10.0f}  {row['note']}", flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
