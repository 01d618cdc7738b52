"""One PPO iteration's wall time at a fixed tiny config, and peak memory of PPO vs LM training.

    python benchmarks/bench_ppo.py

Config: PaLM `tiny`, 16 rollouts of 16-token prompts to 64 tokens in all (no EOS, so every
response has 48 tokens), one PPO epoch in minibatches of 8, torch.set_num_threads(2). The time is
the median of repeats after a warm-up.
Memory: one PPO iteration against one LM training step (forward, backward, AdamW; full fine-tune)
on the same model (preset `small`) and batch of 16 x 64 tokens, above the memory of the built
model; on CUDA torch.cuda.max_memory_allocated, on CPU the rise of peak RSS in a fresh subprocess
per measurement (Hydra-RLHF reports LoRA-PPO below SFT).
The iteration is timed with fp32 rollouts and with bf16 ones (rollout_dtype bf16: a bf16 copy of
the policy samples, the learner scores in fp32), and at preset `small` as well as `tiny`, where the
matrix products are large enough for bf16 to pay.
If palm-rlhf-pytorch (0.8.0) is installed, its RLHFTrainer does the same work (16 rollouts, one
learning pass in minibatches of 8) and the speed ratio is printed.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.ppo import RLHFTrainer
from palm_rlhf.tokenizer import EOS_ID, ByteTokenizer

BATCH, MINIBATCH, PROMPT_LEN, SEQ_LEN, REPEATS = 16, 8, 16, 64, 5
MEMORY_PRESET = "small"  # tiny's activations are lost in the allocator's noise


def count_byte(seq, prompt_mask, mask):
    return ((seq == ord("a")) & mask & ~prompt_mask).float().sum(dim=1)


def prompts():
    torch.manual_seed(0)
    return torch.cat((torch.full((8, 1), EOS_ID), torch.randint(0, 256, (8, PROMPT_LEN - 1))), dim=1)


class NoEOS(ByteTokenizer):
    """Every response runs to SEQ_LEN, in both libraries, so both do the same sampling work."""

    eos_id = -1


def ours(preset="tiny", rollout_dtype="fp32"):
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name(preset))
    trainer = RLHFTrainer(palm=palm, reward_fn=count_byte, prompt_token_ids=prompts(), tokenizer=NoEOS(),
                          epochs=1, minibatch_size=MINIBATCH, rollout_batch_size=BATCH, max_seq_len=SEQ_LEN,
                          rollout_dtype=rollout_dtype)
    return lambda: trainer.step(SEQ_LEN, BATCH)


def anchor():
    from palm_rlhf_pytorch import PaLM as AnchorPaLM, RewardModel, RLHFTrainer as AnchorTrainer

    torch.manual_seed(0)
    palm = AnchorPaLM(num_tokens=258, dim=64, depth=2, heads=4, dim_head=16)
    trainer = AnchorTrainer(palm=palm, reward_model=RewardModel(palm, num_binned_output=5), prompt_token_ids=prompts(),
                            minibatch_size=MINIBATCH, epochs=1)
    return lambda: trainer.train(num_episodes=1, max_timesteps=BATCH, update_timesteps=BATCH, max_seq_len=SEQ_LEN, eos_token=None)


def lm_step(preset="tiny"):
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name(preset)).to("cuda" if torch.cuda.is_available() else "cpu")
    optimizer = torch.optim.AdamW(palm.parameters(), lr=1e-4)
    batch = torch.randint(0, 256, (BATCH, SEQ_LEN), device=palm.device)

    def step():
        palm(batch, return_loss=True).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_time(make, repeats=REPEATS) -> float:
    work = make()
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(name) -> float:
    """MiB that one `name` ('ppo' or 'lm') step adds at its peak to the built model, in this process."""
    work = dict(ppo=ours, lm=lm_step)[name](MEMORY_PRESET)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline = current_rss_mib()
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline  # ru_maxrss is KiB on Linux


def peak_memory_in_subprocess(name) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory", name], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    torch.set_num_threads(2)
    fp32_times = {}
    for preset in ("tiny", "small"):
        fp32, bf16 = (median_time(lambda dtype=dtype: ours(preset, dtype)) for dtype in ("fp32", "bf16"))
        print(f"PPO iteration ({preset}, {BATCH} rollouts x {SEQ_LEN} tokens, 1 epoch, minibatch {MINIBATCH}), median of {REPEATS}: "
              f"fp32 rollouts {fp32 * 1e3:.1f} ms, bf16 rollouts {bf16 * 1e3:.1f} ms ({fp32 / bf16:.2f}x)", flush=True)
        fp32_times[preset] = fp32
    ppo_time = fp32_times["tiny"]
    ppo_mem, lm_mem = peak_memory_in_subprocess("ppo"), peak_memory_in_subprocess("lm")
    where = "CUDA allocated" if torch.cuda.is_available() else "CPU peak RSS rise"
    print(f"peak memory ({where}, preset {MEMORY_PRESET}, {BATCH} x {SEQ_LEN} tokens): PPO iteration {ppo_mem:.1f} MiB, LM training step {lm_mem:.1f} MiB, "
          f"ratio {ppo_mem / lm_mem:.2f}x")
    try:
        import palm_rlhf_pytorch  # noqa: F401
    except ImportError:
        print("palm-rlhf-pytorch not installed: pip install --no-deps palm-rlhf-pytorch==0.8.0 to compare")
        return
    anchor_time = median_time(anchor, repeats=1)
    print(f"palm-rlhf-pytorch 0.8.0, same work: {anchor_time * 1e3:.1f} ms; ours is {anchor_time / ppo_time:.1f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", choices=["ppo", "lm"], help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args()
    if args.memory:
        torch.set_num_threads(2)
        print(json.dumps(peak_memory(args.memory)))
    else:
        main()
