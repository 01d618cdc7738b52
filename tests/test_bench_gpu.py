"""benchmarks/bench_gpu.py: its FLOP and bandwidth arithmetic against hand counts for the tiny preset,
and the whole benchmark end to end on CPU (the device's peak and bandwidth given by flags)."""
import sys

import pytest
import torch
from launch import ROOT
from torch.utils.flop_counter import FlopCounterMode

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.generate import KVCache

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402

TINY = PaLMConfig.from_name("tiny")  # dim 64, depth 2, 4 heads of 16, ff_mult 4, 258 tokens, tied embedding
# tiny's weights that multiply an activation, counted by hand from its shapes
FUSED_IN = 64 * (4 * 16 + 16 + 16 + 256 + 256)  # q's 4 heads, the one k and v head, SwiGLU's value and gate
ATTN_OUT = 4 * 16 * 64
FF_OUT = 256 * 64
TO_LOGITS = 64 * 258  # the tied embedding, once
N = 2 * (FUSED_IN + ATTN_OUT + FF_OUT) + TO_LOGITS  # 135296
NORMS = 3 * 64  # two blocks' LayerNorms and the final one: parameters, but no matmul
BF16_WEIGHT_BYTES = 2 * (N + NORMS)
KV_PER_POSITION = 2 * 2 * 16 * 2  # a key and a value, 2 layers, one head of 16, 2 bytes each


def test_matmul_params_counts_every_linear_weight_once():
    assert bench_gpu.matmul_params(TINY) == N == 135296
    assert sum(p.numel() for p in PaLM.from_config(TINY).parameters()) == N + NORMS


def test_training_flops_are_6n_plus_12lhqt_and_what_a_forward_and_backward_multiply():
    seq_len = 32
    per_token = 6 * N + 12 * 2 * 4 * 16 * seq_len  # 12 L H Q T
    assert bench_gpu.train_flops_per_token(TINY, seq_len) == per_token == 860928
    torch.manual_seed(0)
    palm = PaLM.from_config(TINY)
    palm.attn_backend = "math"  # its attention is plain matmuls, which the counter sees (as the full T x T)
    with FlopCounterMode(display=False) as counter:
        palm(torch.randint(0, 256, (3, seq_len + 1)), return_loss=True).backward()
    assert counter.get_total_flops() == 3 * seq_len * per_token


def test_the_kv_cache_holds_one_key_and_value_head_per_layer():
    assert bench_gpu.kv_bytes_per_position(TINY, 2) == KV_PER_POSITION == 128
    cache = KVCache(TINY.depth, 1, 10, TINY.dim_head, "cpu", torch.bfloat16)  # 1 row, 10 positions
    assert (cache.k.nbytes + cache.v.nbytes) / 10 == KV_PER_POSITION


def test_the_decode_bound_reads_every_weight_per_pass_and_each_rows_cache_so_far():
    # batch 4, a prompt of 3, 2 new tokens: two passes read the weights; each row's cache has 3, then 4 positions
    expected = 2 * BF16_WEIGHT_BYTES + 4 * KV_PER_POSITION * (3 + 4)
    assert bench_gpu.decode_bytes(BF16_WEIGHT_BYTES, KV_PER_POSITION, 4, 3, 2) == expected
    bound = bench_gpu.decode_bound_tokens_per_s(BF16_WEIGHT_BYTES, KV_PER_POSITION, 4, 3, 2, bandwidth=1e9)
    assert bound == pytest.approx(4 * 2 * 1e9 / expected)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)),
    ("NVIDIA H100 PCIe", (756e12, 2.0e12)),
    ("NVIDIA H200", (989e12, 4.8e12)),
    ("NVIDIA A100-SXM4-80GB", (312e12, 2.0e12)),
])
def test_known_devices_have_their_datasheet_peaks(name, peak):
    assert bench_gpu.device_peak(name) == peak


def test_flags_override_a_devices_peaks_and_an_unknown_device_needs_both():
    assert bench_gpu.device_peak("NVIDIA H200", bandwidth=1e12) == (989e12, 1e12)
    assert bench_gpu.device_peak("cpu", 1e12, 2e10) == (1e12, 2e10)
    with pytest.raises(ValueError, match="--peak_flops and --bandwidth"):
        bench_gpu.device_peak("cpu", peak_flops=1e12)


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_cpu(capsys):
    rows = bench_gpu.main([
        "--device", "cpu", "--peak_flops", "1e12", "--bandwidth", "2e10", "--presets", "tiny", "--batch", "2",
        "--seq_len", "32", "--new_tokens", "8", "--gen_batches", "1", "4", "--rl_batch", "4", "--group_size", "2",
        "--rl_minibatch", "2", "--repeats", "1", "--threads", "1", "--no_peers",
    ])
    by_task = {row["task"]: row for row in rows}
    assert list(by_task) == ["train", "decode_b1", "decode_b4", "ppo", "grpo"]
    assert all(row["tokens_per_s"] > 0 and row["peak_mb"] > 0 for row in rows)
    train = by_task["train"]
    assert train["share"] == pytest.approx(860928 * train["tokens_per_s"] / 1e12)  # MFU
    for batch in (1, 4):
        decode = by_task[f"decode_b{batch}"]
        read = 8 * BF16_WEIGHT_BYTES + batch * KV_PER_POSITION * sum(16 + t for t in range(8))
        assert decode["bound"] == pytest.approx(batch * 8 * 2e10 / read)
        assert decode["share"] == pytest.approx(decode["tokens_per_s"] / decode["bound"])
    printed = capsys.readouterr().out
    for task in by_task:
        assert f"tiny    {task}" in printed
    assert "s/iteration: rollout" in printed
