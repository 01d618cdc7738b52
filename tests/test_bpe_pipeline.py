"""Every stage end to end with a BPE tokenizer, at tiny size: train_lm.py learns the BPE and saves it
beside the model; the reward model, PPO, GRPO, DPO and evaluate.py read it from the checkpoint, and
nothing in between is a byte value (the feedback app's sampling: tests/feedback/test_generate.py)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from palm_rlhf import PaLM, data
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import BPETokenizer, load_tokenizer
from palm_rlhf.config import parse_config
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320


def script_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args):
    out = subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """train_lm.py with --tokenizer bpe on a folder of text files, then train_reward.py on that LM."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["The movie is a triumph, witty and warm. ", "The film is a bore, dull and long. ",
                              "A naïve café film, 東京 at night. "]):
        (corpus / f"doc{i}.txt").write_text(text * 60)
    run_script("train_lm.py", "--tokenizer", "bpe", "--vocab_size", str(VOCAB), "--corpus", str(corpus),
               "--preset", "tiny", "--steps", "4", "--seq_len", "32", "--batch_size", "4", "--eval_every", "2",
               "--eval_batches", "1", "--sample_every", "4", "--sample_len", "16", "--out_dir", str(root / "lm"),
               "--cache_dir", str(root / "cache"))
    run_script("train_reward.py", "--lm_checkpoint", str(root / "lm" / "final"), "--batch_size", "8", "--max_len", "48",
               "--max_test", "16", "--eval_every", "2", "--finetune_last_n_layers", "1", "--steps", "2",
               "--out_dir", str(root / "reward"))
    return root


def test_train_lm_saves_the_bpe_beside_the_model_and_reports_bits_per_byte(stages):
    lm = PaLM.from_pretrained(stages / "lm" / "final")
    assert isinstance(lm.tokenizer, BPETokenizer) and lm.num_tokens == lm.tokenizer.vocab_size == VOCAB
    assert lm.pad_id == lm.tokenizer.pad_id == 0
    metrics = read_metrics(stages / "lm" / "metrics.csv")
    (_, losses), (_, bpb) = metrics["val_loss"], metrics["val_bpb"]
    ratio = [loss / math.log(2) / b for loss, b in zip(losses, bpb)]  # bytes per token of the valid split
    assert all(2 < r < 8 for r in ratio) and max(ratio) - min(ratio) < 1e-6  # BPE: several bytes per token


def test_reward_model_reads_the_lm_tokenizer(stages):
    reward_model = RewardModel.from_pretrained(stages / "reward" / "final")
    assert reward_model.palm.tokenizer.vocab_size == VOCAB
    assert json.loads((stages / "reward" / "final" / "base" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


@pytest.mark.parametrize("script", ["train_ppo.py", "train_grpo.py"])
def test_rl_scripts_sample_and_score_in_bpe_tokens(stages, script, tmp_path):
    group = ["--rollout_batch_size", "4", "--minibatch_size", "4"] if script == "train_ppo.py" else \
        ["--prompts_per_step", "2", "--group_size", "2", "--minibatch_size", "4"]
    out = run_script(script, "--lm_checkpoint", str(stages / "lm" / "final"), "--reward_checkpoint", str(stages / "reward" / "final"),
                     "--num_eval_prompts", "3", "--max_seq_len", "48", "--best_of", "1,2", "--iterations", "1",
                     *group, "--out_dir", str(tmp_path))
    assert "after" in out.stdout
    policy = PaLM.from_pretrained(tmp_path / "final")
    assert isinstance(policy.tokenizer, BPETokenizer) and policy.tokenizer.fingerprint == load_tokenizer(stages / "lm" / "final").fingerprint


def test_dpo_on_bpe(stages, tmp_path):
    train_dpo = script_module("train_dpo")
    cfg = parse_config(train_dpo.TrainDPOConfig, [
        "--lm_checkpoint", str(stages / "lm" / "final"), "--out_dir", str(tmp_path), "--steps", "2", "--batch_size", "2",
        "--max_pairs", "16", "--max_eval_pairs", "4", "--num_eval_prompts", "4", "--gen_len", "6", "--eval_every", "2"])
    summary = train_dpo.train(cfg)
    assert math.isfinite(summary["kl_per_response"]) and (tmp_path / "final" / "tokenizer.json").is_file()


def test_evaluate_on_bpe(stages, tmp_path):
    evaluate = script_module("evaluate")
    cfg = evaluate.EvaluateConfig(policies=f"same={stages / 'lm' / 'final'}", lm_checkpoint=str(stages / "lm" / "final"),
                                  reward_checkpoint=str(stages / "reward" / "final"), num_prompts=4, samples=2,
                                  best_of="1,2", max_seq_len=48, out_dir=str(tmp_path), batch_size=16)
    rows = {row["name"]: row for row in evaluate.evaluate(cfg)}
    assert rows["same"]["kl"] == 0
    assert rows["LM"]["length"] > 0 and rows["LM"]["bits_per_byte"] > 0


def test_bits_per_byte_scores_every_token_of_the_split_once(stages):
    bench = importlib.util.spec_from_file_location("bits_per_byte", ROOT / "benchmarks" / "bits_per_byte.py")
    module = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(module)
    palm = PaLM.from_pretrained(stages / "lm" / "final").eval()
    cfg = module.BitsPerByteConfig(corpus=str(stages / "corpus"), cache_dir=str(stages / "cache"), seq_len=4096)
    bpb, count, ratio = module.bits_per_byte(palm, cfg)  # one window holds the whole split
    tokens = torch.from_numpy(np.fromfile(data.corpus_token_file(cfg.corpus, "valid", palm.tokenizer, cfg.cache_dir), dtype=np.uint16).astype(np.int64))
    assert count == len(tokens) - 1 < 4096 and ratio > 2
    with torch.no_grad():
        loss = palm(tokens[None], return_loss=True).item()
    assert bpb == pytest.approx(loss / math.log(2) / ratio, rel=1e-4)
    short, short_count, _ = module.bits_per_byte(palm, module.BitsPerByteConfig(corpus=cfg.corpus, cache_dir=cfg.cache_dir, seq_len=16, batch_size=3))
    assert short_count == count and short != pytest.approx(bpb, rel=1e-6)  # shorter contexts, same tokens
