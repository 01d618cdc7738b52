"""Training and generation throughput of palm_rlhf.PaLM, beside its peers when they are installed.

    python benchmarks/bench_palm.py                          # dim 512, depth 6, heads 8, dim_head 64
    python benchmarks/bench_palm.py --tasks generate --rounds 3
    python benchmarks/bench_palm.py --profile                # per-op time of one decoding step, ours
    python benchmarks/bench_palm.py --tasks generate --dtype bf16 --gen_batches 8 32   # every model in bf16

Training: forward + backward + AdamW step on a batch of 4 x 512 tokens. Generation: 256 new tokens
from a 16-token prompt at batch 1, 8 and 32, sampled at temperature 1 with no top-k/top-p and no EOS,
so that every implementation samples every token of every row. With --dtype bf16 every model's
weights are cast to bf16 for generation, so that decoding is compared at equal precision.

Peers, each timed only when installed (neither is a dependency):
- palm-rlhf-pytorch 0.8.0 (`pip install palm-rlhf-pytorch==0.8.0`): the same PaLM, training and generation;
- transformers (`pip install transformers`): `generate` with its KV cache on a LlamaForCausalLM of the
  same shape built from a config (random weights, no download): same width, depth, heads and head
  width, one key/value head (multi-query, as ours; --llama_kv_heads 8 for full multi-head), an MLP of
  the same FLOPs as our SwiGLU (intermediate_size = ff_mult * dim), tied embeddings, the same vocab.

Each figure is the median of --repeats timed runs after one warm-up, measured in a fresh subprocess
so that its peak memory (CUDA allocator peak, or the process's peak RSS on CPU, imports included)
belongs to it alone; with --rounds R the implementations take turns R times and each figure is the
median over the rounds; the ratio column is the median over rounds of ours / that peer within the
round. Compare ratios within one run: the
machines are shared.
"""
import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

PALM_RLHF_PYTORCH, TRANSFORMERS = "palm_rlhf_pytorch", "transformers"
PEERS = {PALM_RLHF_PYTORCH: ("train", "generate"), TRANSFORMERS: ("generate",)}  # peer -> tasks it runs
# wall time; or the process's CPU time, which other processes' time slices do not inflate (their
# use of the caches and memory bandwidth still does): meaningful with --threads 1
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(impl: str, args):
    shape = dict(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head)
    if impl == "ours":
        from palm_rlhf import PaLM

        return PaLM(num_tokens=args.num_tokens, flash_attn=True, **shape)
    if impl == PALM_RLHF_PYTORCH:
        from palm_rlhf_pytorch import PaLM as BaselinePaLM

        return BaselinePaLM(num_tokens=args.num_tokens, flash_attn=True, **shape)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.num_tokens, hidden_size=args.dim, num_hidden_layers=args.depth,
        num_attention_heads=args.heads, num_key_value_heads=args.llama_kv_heads, head_dim=args.dim_head,
        intermediate_size=4 * args.dim,  # gate, up and down projections: the FLOPs of our SwiGLU (ff_mult 4)
        tie_word_embeddings=True, max_position_embeddings=args.prompt_len + args.new_tokens,
    )
    return LlamaForCausalLM(config)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train(model, args, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step():
        loss = model(batch, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    return args.batch * args.seq_len, step


def generate_fn(impl: str, model, args, prompt):
    """A call that samples args.new_tokens tokens after `prompt` (b, n) at temperature 1, no EOS."""
    total_len = args.prompt_len + args.new_tokens
    if impl == TRANSFORMERS:
        return lambda: model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0,
        )
    return lambda: model.generate(total_len, prompt=prompt, temperature=1.0)


def time_generate(impl, model, args, device, batch):
    prompt = torch.randint(0, 256, (batch, args.prompt_len), device=device)
    generate = generate_fn(impl, model, args, prompt)

    def step():
        with torch.no_grad():
            generate()
        sync(device)

    return batch * args.new_tokens, step


def measure(impl: str, task: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(impl, args).to(device)
    if args.compile and task == "train":
        model = torch.compile(model)
    if task != "train":
        model = model.to(DTYPES[args.dtype])
    tokens, step = time_train(model, args, device) if task == "train" else time_generate(
        impl, model.eval(), args, device, int(task.split("_b")[1])
    )
    step()  # warm-up
    times = []
    repeats = args.repeats if impl != PALM_RLHF_PYTORCH or task == "train" else max(1, args.repeats // 2)
    clock = CLOCKS[args.clock]
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(tokens_per_s=tokens / statistics.median(times), peak_mb=peak_mb)


def profile_decoding(args, rows: int = 12):
    """Per-op self time of our decoding, per decoding step, at each generation batch size."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build("ours", args).eval()
    for batch in args.gen_batches:
        prompt = torch.randint(0, 256, (batch, args.prompt_len))
        generate = generate_fn("ours", model, args, prompt)
        generate()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            generate()
            elapsed = time.perf_counter() - start
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in ops)
        print(f"\nbatch {batch}: {elapsed / args.new_tokens * 1e3:.2f} ms per step under the profiler "
              f"(the prefill included), {total_us / 1e3 / args.new_tokens:.2f} ms of op self time per step")
        print(f"{'op':<36}{'ms/step':>9}{'share':>8}{'calls/step':>12}")
        for e in ops[:rows]:
            print(f"{e.key:<36}{e.self_cpu_time_total / 1e3 / args.new_tokens:>9.3f}"
                  f"{e.self_cpu_time_total / total_us:>8.1%}{e.count / args.new_tokens:>12.1f}")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512, help="model width")
    parser.add_argument("--depth", type=int, default=6, help="number of layers")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--dim_head", type=int, default=64, help="width of one head")
    parser.add_argument("--num_tokens", type=int, default=258, help="vocabulary: 256 bytes, PAD and EOS")
    parser.add_argument("--llama_kv_heads", type=int, default=1, help="key/value heads of the transformers Llama (1: multi-query, as ours)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--seq_len", type=int, default=512, help="training sequence length")
    parser.add_argument("--prompt_len", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--gen_batches", type=int, nargs="+", default=[1, 8, 32], help="generation batch sizes")
    parser.add_argument("--tasks", nargs="+", choices=["train", "generate"], default=["train", "generate"], help="what to time")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of every model's weights for generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per figure, taken in turns (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time (with --threads 1, on a busy machine)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models for the training figure")
    parser.add_argument("--no_peers", action="store_true", help="time ours alone, even if peers are installed")
    parser.add_argument("--profile", action="store_true", help="print the per-op time of our decoding steps instead")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "TASK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_in_subprocess(impl: str, task: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", impl, task],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))
        return
    if args.profile:
        profile_decoding(args)
        return
    peers = [] if args.no_peers else [peer for peer in PEERS if installed(peer)]
    tasks = (["train"] if "train" in args.tasks else []) + (
        [f"generate_b{b}" for b in args.gen_batches] if "generate" in args.tasks else [])
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads, {args.clock} time"
    print(f"PaLM dim={args.dim} depth={args.depth} heads={args.heads} dim_head={args.dim_head} ({device})")
    print(f"train{' (torch.compile)' if args.compile else ''}: batch {args.batch} x {args.seq_len}; "
          f"generate: {args.new_tokens} new tokens from {args.prompt_len}, sampled at temperature 1, weights in {args.dtype}")
    print(f"{'task':<14}{'impl':<20}{'tokens/s':>12}{'peak MB':>10}{'ours/peer':>11}")
    for task in tasks:
        impls = ["ours"] + [peer for peer in peers if task.split("_b")[0] in PEERS[peer]]
        # the implementations take turns, round after round, so that a slow spell of the shared
        # machine lands on all of them; each gets its median over the rounds
        rounds = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                rounds[impl].append(run_in_subprocess(impl, task, argv))
        for impl, runs in rounds.items():
            speed = statistics.median(r["tokens_per_s"] for r in runs)
            # the ratio is paired within each round (both saw the same spell of the machine), then the median
            ratio = "" if impl == "ours" else f"{statistics.median(o['tokens_per_s'] / r['tokens_per_s'] for o, r in zip(rounds['ours'], runs)):10.2f}x"
            print(f"{task:<14}{impl:<20}{speed:>12.1f}{max(r['peak_mb'] for r in runs):>10.0f}{ratio:>11}", flush=True)


if __name__ == "__main__":
    main()
