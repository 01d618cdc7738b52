"""One GRPO iteration's wall time at TRL's shapes, beside TRL's GRPOTrainer when it is installed.

    python benchmarks/bench_grpo.py
    python benchmarks/bench_grpo.py --rounds 3 --repeats 10
    python benchmarks/bench_grpo.py --dim 512 --depth 6 --heads 8 --dim_head 64   # a larger model

The work of one iteration, the same for both: 4 prompts of 16 tokens, 4 samples of each (a group of
4), 48 new tokens per sample at temperature 1 with no EOS (every sample runs to its 48 tokens),
reward = the count of the byte "a" in the response, GRPO advantages, one optimizer step on the 16
responses (one epoch of one minibatch), no KL term (beta 0: TRL's default, so no reference pass for
either), fp32 on 2 CPU threads. Ours is timed twice: with fp32 rollouts and with bf16 ones
(rollout_dtype bf16: a bf16 copy of the policy samples, the learner scores and updates in fp32);
TRL's runs in fp32 (its bf16 option trains in bf16 as well, which is not the same iteration).

Models (by default; --dim, --depth, --heads, --dim_head change both): ours a PaLM of dim 128,
depth 2, 4 heads of 32, one key/value head, SwiGLU of width 4 x dim;
TRL's a LlamaForCausalLM built from a config of the same shape (random weights, no download), with
a byte-level tokenizer built in memory. Each trainer keeps its own design otherwise: ours trains a
LoRA scope of the frozen PaLM and shares each prompt's KV cache across its group; TRL trains every
weight and samples with transformers' `generate`. TRL's settings that differ from its defaults, for
a like-for-like iteration: fp32 (bf16 off), no gradient checkpointing, no logging or saving,
per-device batch 16 = 4 prompts x 4 generations, so one generation round and one optimizer step per
iteration (TRL: pip install trl; not a dependency).

Each figure is the median of --repeats timed iterations after --warmup ones, in a fresh subprocess
per measurement; with --rounds R the two take turns R times, each figure is the median over the
rounds, and the ratio the median of the within-round ratios. Peak memory: the rise of the process's
peak RSS during the iterations above its RSS before them (imports and the built model excluded).
Compare ratios within one run: the machines are shared.
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

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 4, 4, 16, 48
IMPLS = {"ours": "fp32", "ours_bf16": "bf16"}  # our runs -> their rollout_dtype
REWARD_BYTE = ord("a")
# wall time; or the process's CPU time, which other processes' time slices do not inflate (their use
# of the caches and memory bandwidth still does): meaningful with --threads 1
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def prompt_bytes(count: int = 64) -> list[bytes]:
    """`count` random 16-byte prompts of printable ASCII (the same for both trainers)."""
    g = torch.Generator().manual_seed(0)
    return [bytes(torch.randint(32, 127, (PROMPT_LEN,), generator=g).tolist()) for _ in range(count)]


def ours(args, rollout_dtype: str):
    """-> a call that runs one of our GRPO iterations, sampling in `rollout_dtype`."""
    from palm_rlhf import PaLM
    from palm_rlhf.grpo import GRPOTrainer
    from palm_rlhf.tokenizer import ByteTokenizer

    class NoEOS(ByteTokenizer):
        eos_id = -1  # no sample ends early: every one runs to its 48 tokens, as in TRL's run

    def count_byte(seq, prompt_mask, mask):
        return ((seq == REWARD_BYTE) & mask & ~prompt_mask).float().sum(dim=1)

    torch.manual_seed(0)
    palm = PaLM(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head, ff_mult=4)
    trainer = GRPOTrainer(palm=palm, reward_fn=count_byte, prompt_token_ids=[torch.tensor(list(p)) for p in prompt_bytes()],
                          tokenizer=NoEOS(), estimator="grpo", group_size=GROUP, prompts_per_step=PROMPTS, beta=0.0,
                          epochs=1, minibatch_size=PROMPTS * GROUP, max_seq_len=PROMPT_LEN + NEW_TOKENS,
                          rollout_dtype=rollout_dtype)
    return lambda: trainer.step(max_seq_len=PROMPT_LEN + NEW_TOKENS, prompts_per_step=PROMPTS, temperature=1.0)


def byte_tokenizer():
    """A transformers tokenizer of 256 bytes plus PAD and EOS (258 ids, as ours), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def trl(args, iterations: int):
    """-> a call that runs TRL's GRPOTrainer for `iterations` iterations and returns their wall times."""
    import tempfile

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def count_byte(completions, completion_ids, **kwargs):
        return [float(ids.count(REWARD_BYTE)) for ids in completion_ids]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            self.start = CLOCKS[args.clock]()

        def on_step_end(self, *_, **__):
            self.times.append(CLOCKS[args.clock]() - self.start)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=258, hidden_size=args.dim, num_hidden_layers=args.depth, num_attention_heads=args.heads, num_key_value_heads=1,
        head_dim=args.dim_head, intermediate_size=4 * args.dim, tie_word_embeddings=True, pad_token_id=256, eos_token_id=257,
        max_position_embeddings=PROMPT_LEN + NEW_TOKENS,
    ))
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP, gradient_accumulation_steps=1,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, num_iterations=1, max_steps=iterations,
        generation_kwargs=dict(min_new_tokens=NEW_TOKENS),  # EOS masked out: no sample ends early, as in ours
        report_to="none", logging_steps=10**9, save_strategy="no", disable_tqdm=True, seed=0,
    )
    dataset = Dataset.from_dict({"prompt": [p.decode() for p in prompt_bytes()]})
    times = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=count_byte, args=config, train_dataset=dataset,
                          processing_class=byte_tokenizer(), callbacks=[times])
    torch.set_num_threads(args.threads)  # after the trainer's set-up, which may change it

    def run():
        trainer.train()
        return times.times

    return run


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(impl: str, args) -> dict:
    torch.set_num_threads(args.threads)
    iterations = args.warmup + args.repeats
    if impl in IMPLS:
        step = ours(args, IMPLS[impl])
        baseline = current_rss_mib()
        times, clock = [], CLOCKS[args.clock]
        for _ in range(iterations):
            start = clock()
            step()
            times.append(clock() - start)
    else:
        run = trl(args, iterations)
        baseline = current_rss_mib()
        times = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(seconds=statistics.median(times[args.warmup:]), peak_rise_mb=peak - baseline,
                threads=torch.get_num_threads())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128, help="model width (both models)")
    parser.add_argument("--depth", type=int, default=2, help="layers")
    parser.add_argument("--heads", type=int, default=4, help="query heads (one key/value head)")
    parser.add_argument("--dim_head", type=int, default=32, help="width of one head")
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations per figure (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="iterations run before the timed ones")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per figure, taken in turns (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time (with --threads 1, on a busy machine)")
    parser.add_argument("--no_peers", action="store_true", help="time ours alone, even if TRL is installed")
    parser.add_argument("--worker", choices=[*IMPLS, "trl"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_in_subprocess(impl: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", impl], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    impls = list(IMPLS) + (["trl"] if not args.no_peers and importlib.util.find_spec("trl") is not None else [])
    print(f"GRPO iteration: {PROMPTS} prompts x {GROUP} samples x {NEW_TOKENS} new tokens after {PROMPT_LEN}, "
          f"model dim {args.dim} depth {args.depth} heads {args.heads} (one key/value head) ff {4 * args.dim}, {args.threads} threads, "
          f"{args.clock} time")
    rounds = {impl: [] for impl in impls}
    for _ in range(args.rounds):  # the trainers take turns, so that a slow spell lands on both
        for impl in impls:
            rounds[impl].append(run_in_subprocess(impl, argv))
    print(f"{'impl':<11}{'s/iteration':>13}{'peak MB rise':>14}{'TRL/this':>10}")
    for impl, runs in rounds.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        # paired within each round (both saw the same spell of the machine), then the median
        ratio = "" if "trl" not in rounds else f"{statistics.median(t['seconds'] / r['seconds'] for r, t in zip(runs, rounds['trl'])):9.2f}x"
        print(f"{impl:<11}{seconds:>13.4f}{max(r['peak_rise_mb'] for r in runs):>14.1f}{ratio:>10}", flush=True)
    if "trl" not in rounds:
        print("TRL not installed: pip install trl to time its GRPOTrainer beside ours")


if __name__ == "__main__":
    main()
