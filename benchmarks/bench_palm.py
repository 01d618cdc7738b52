"""Training and generation throughput of palm_rlhf.PaLM, beside PaLM-rlhf-pytorch when installed.

    python benchmarks/bench_palm.py                 # dim 512, depth 6, heads 8, dim_head 64
    python benchmarks/bench_palm.py --preset small --repeats 5

Training: forward + backward + AdamW step on a batch of 4 x 512 tokens. Generation: 256 new tokens
from a 16-token prompt at batch 1 and 8. Each figure is the median of --repeats timed runs after one
warm-up, measured in a fresh subprocess so that its peak memory (CUDA allocator peak, or the process's
peak RSS on CPU) belongs to it alone; with --rounds R the two implementations take turns R times and
each figure is the median over the rounds. Compare ratios within one run: the machines are shared.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

BASELINE = "palm_rlhf_pytorch"  # pip install palm-rlhf-pytorch==0.8.0 (not a dependency)


def build(impl: str, args):
    shape = dict(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head)
    if impl == "ours":
        from palm_rlhf import PaLM

        return PaLM(num_tokens=256, flash_attn=True, **shape)
    from palm_rlhf_pytorch import PaLM as BaselinePaLM

    return BaselinePaLM(num_tokens=256, flash_attn=True, **shape)


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


def time_generate(model, args, device, batch):
    prompt = torch.randint(0, 256, (batch, args.prompt_len), device=device)
    total_len = args.prompt_len + args.new_tokens

    def step():
        with torch.no_grad():
            model.generate(total_len, prompt=prompt)
        sync(device)

    return batch * args.new_tokens, step


def measure(impl: str, task: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(impl, args).to(device)
    if args.compile and task == "train":
        model = torch.compile(model)
    tokens, step = time_train(model, args, device) if task == "train" else time_generate(
        model.eval(), args, device, int(task.split("_b")[1])
    )
    step()  # warm-up
    times = []
    repeats = args.repeats if impl == "ours" or task == "train" else max(1, args.repeats // 2)
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(tokens_per_s=tokens / statistics.median(times), peak_mb=peak_mb)


def baseline_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec(BASELINE) is not None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512, help="model width")
    parser.add_argument("--depth", type=int, default=6, help="number of layers")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--dim_head", type=int, default=64, help="width of one head")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--seq_len", type=int, default=512, help="training sequence length")
    parser.add_argument("--prompt_len", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--gen_batches", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per figure, taken in turns (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models for the training figure")
    parser.add_argument("--no_baseline", action="store_true", help="skip PaLM-rlhf-pytorch even if installed")
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
    impls = ["ours"] + ([BASELINE] if baseline_installed() and not args.no_baseline else [])
    tasks = ["train"] + [f"generate_b{b}" for b in args.gen_batches]
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(f"PaLM dim={args.dim} depth={args.depth} heads={args.heads} dim_head={args.dim_head} ({device})")
    print(f"train{' (torch.compile)' if args.compile else ''}: batch {args.batch} x {args.seq_len}; generate: {args.new_tokens} new tokens from {args.prompt_len}")
    print(f"{'task':<14}{'impl':<20}{'tokens/s':>12}{'peak MB':>10}{'ratio':>9}")
    for task in tasks:
        # the implementations take turns, round after round, so that a slow spell of the shared
        # machine lands on both; each gets its median over the rounds
        rounds = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                rounds[impl].append(run_in_subprocess(impl, task, argv))
        results = {impl: dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs),
                              peak_mb=max(r["peak_mb"] for r in runs)) for impl, runs in rounds.items()}
        for impl, r in results.items():
            ratio = r["tokens_per_s"] / results[BASELINE]["tokens_per_s"] if BASELINE in results else float("nan")
            shown = f"{ratio:8.2f}x" if impl == "ours" and BASELINE in results else ""
            print(f"{task:<14}{impl:<20}{r['tokens_per_s']:>12.1f}{r['peak_mb']:>10.0f}{shown:>9}", flush=True)


if __name__ == "__main__":
    main()
