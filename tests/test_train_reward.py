import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.data import write_jsonl
from palm_rlhf.reward import RewardModel, encode_reward_input, pad_right
from palm_rlhf.tokenizer import EOS_ID
from palm_rlhf.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch_size", "8", "--max_len", "96", "--max_test", "48", "--eval_every", "3",
        "--finetune_last_n_layers", "1"]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_reward.py"), *args], capture_output=True, text=True, cwd=ROOT)


def scores(model, texts):
    seq, prompt_mask, mask = pad_right(*zip(*(encode_reward_input(p, r) for p, r in texts)))
    with torch.no_grad():
        return model.eval().score(seq, prompt_mask, mask)


TEXTS = [("The movie is", " a triumph."), ("The movie is", " a bore.")]


def test_help_lists_every_option():
    out = run_script("--help")
    assert out.returncode == 0
    for option in ("--lm_checkpoint", "--mode", "--data", "--lora_r", "--finetune_last_n_layers", "--resume", "--mixed_precision"):
        assert option in out.stdout


def test_bad_input_gets_a_clear_error(tmp_path):
    out = run_script("--lm_checkpoint", "none", "--mode", "ranking", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "--mode ranking: unknown mode 'ranking'; choose one of pairwise, binned" in out.stderr
    out = run_script("--lm_checkpoint", "none", "--pool", "max", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "--pool max: unknown pool 'max'; choose one of mean, eos" in out.stderr
    out = run_script("--lm_checkpoint", str(tmp_path / "nothing"), "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "run train_lm.py first" in out.stderr
    out = run_script("--lm_checkpoint", "none", "--mode", "binned", "--corrupt_prob", "0.5", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "it needs --mode pairwise" in out.stderr
    out = run_script("--lm_checkpoint", "none", "--truncate_prob", "2", "--out_dir", str(tmp_path))
    assert out.returncode != 0 and "--truncate_prob 2: must be <= 1" in out.stderr


def test_augmented_batch_cuts_and_corrupts_the_shares_asked_for():
    spec = importlib.util.spec_from_file_location("train_reward_script", ROOT / "train_reward.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = script.TrainRewardConfig(truncate_prob=0.5, corrupt_prob=0.25)
    batch = [dict(prompt="The movie is", response=" a gorgeous, witty, seductive movie.")] * 40
    sides, ended, corrupted = script.augmented_sides(batch, cfg, np.random.default_rng(0))
    assert 10 <= ended.count(False) <= 30 and len(corrupted) == 10
    for (prompt, response), is_ended in zip(sides, ended):
        assert prompt == "The movie is" and (response == batch[0]["response"]) == is_ended
    assert all(c[0] == s[0] and c[1] != s[1] for c, s in zip(corrupted, sides))
    seq, _, mask = script.collate(sides[:2], PaLM.from_config(PaLMConfig.from_name("tiny")), 96, "cpu", ended[:2])
    last = seq[torch.arange(2), mask.sum(dim=1) - 1]
    assert [bool(t == EOS_ID) for t in last] == ended[:2]


@pytest.mark.parametrize("mode", ["pairwise", "binned"])
def test_run_on_an_lm_checkpoint_end_to_end_keeps_its_base(tmp_path, mode):
    torch.manual_seed(0)
    PaLM.from_config(PaLMConfig.from_name("tiny")).save(tmp_path / "lm")
    run = tmp_path / "run"
    augment = ["--data", "movieReviewSnippets+tweets", "--truncate_prob", "0.5"] + (["--corrupt_prob", "0.25"] if mode == "pairwise" else [])
    out = run_script(*TINY, *augment, "--lm_checkpoint", str(tmp_path / "lm"), "--mode", mode, "--steps", "3", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out pairwise accuracy" in out.stdout and "VADER lexicon" in out.stdout
    final = json.loads((run / "final_metrics.json").read_text())
    assert 0 <= final["test_pairwise_acc"] <= 1 and 0 <= final["vader_pairwise_acc"] <= 1
    assert -1 <= final["test_pearson_r"] <= 1
    assert (run / "reward.png").stat().st_size > 0

    alone = RewardModel.from_pretrained(run / "final")
    rewards = scores(alone, TEXTS)
    assert rewards.shape == (2,) and rewards.isfinite().all()
    if mode == "binned":
        assert "majority class" in out.stdout and final["test_mae"] >= 0
        assert alone.num_binned_output == 5 and ((1 <= rewards) & (rewards <= 5)).all()
    else:
        assert "every pair of each batch's 8 rated texts" in out.stdout
        assert alone.num_binned_output == 0 and final["test_loss"] > 0
    # the base was frozen, so the reward model attaches to the untouched LM, as train_ppo.py does
    shared = RewardModel.from_pretrained(run / "final", palm=PaLM.from_pretrained(tmp_path / "lm"))
    torch.testing.assert_close(scores(shared, TEXTS), rewards)


@pytest.mark.slow
def test_pairwise_run_from_a_fresh_palm_resumes_where_it_stopped(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--lm_checkpoint", "none", "--mode", "pairwise", "--out_dir", str(run)]
    out = run_script(*args, "--steps", "4", "--checkpoint_every", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert RewardModel.from_pretrained(run / "final").num_binned_output == 0

    out = run_script(*args, "--steps", "6", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed at step 4" in out.stdout
    steps, _ = read_metrics(run / "metrics.csv")["train_loss"]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ratings", "pairs"])
def test_jsonl_data_in_either_format(tmp_path, kind):
    if kind == "ratings":
        records = [dict(prompt="Rate:", response=f" {'good ' * (i % 5)}{i}", rating=1 + i % 5) for i in range(60)]
        mode = "binned"
    else:
        records = [dict(prompt=f"Q{i}:", chosen=" yes, gladly.", rejected=" no.") for i in range(60)]
        mode = "pairwise"
    write_jsonl(tmp_path / "data.jsonl", records)
    run = tmp_path / "run"
    out = run_script(*TINY, "--lm_checkpoint", "none", "--data", str(tmp_path / "data.jsonl"), "--mode", mode,
                     "--steps", "2", "--out_dir", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test_pairwise_acc" in json.loads((run / "final_metrics.json").read_text())
    if kind == "pairs":
        out = run_script(*TINY, "--lm_checkpoint", "none", "--data", str(tmp_path / "data.jsonl"), "--mode", "binned",
                         "--out_dir", str(run))
        assert out.returncode != 0 and "binned mode needs ratings" in out.stderr


def test_collected_pairs_add_their_bradley_terry_loss_to_the_rated_texts(tmp_path):
    spec = importlib.util.spec_from_file_location("train_reward_script", ROOT / "train_reward.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [dict(prompt="The movie is", chosen=" a triumph.", rejected=" a bore."),
                        dict(prompt="It was", chosen=" lovely.", rejected=" awful, awful.")])
    both = script.TrainRewardConfig(pairs=str(pairs), batch_size=4)
    data = script.load_data(both)
    assert len(data["train_pairs"]) == 2 and data["train_ratings"]  # every collected pair trained on, none held out
    torch.manual_seed(0)
    model = RewardModel.from_config(PaLM.from_config(PaLMConfig.from_name("tiny")), finetune_last_n_layers=1, dropout=0.0)
    loss = script.training_loss(model, model.palm, data, both, step=3, rank=0, device="cpu")
    ratings_only = script.training_loss(model, model.palm, dict(data, train_pairs=[]), both, step=3, rank=0, device="cpu")
    drawn = script.sample_batch(data["train_pairs"], 4, 3, both.seed, 0)  # the step's pairs, drawn as the loop draws
    chosen = scores(model, [p["chosen"] for p in drawn])
    rejected = scores(model, [p["rejected"] for p in drawn])
    by_hand = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert loss.item() == pytest.approx(ratings_only.item() + by_hand.item(), rel=1e-5)
    with pytest.raises(SystemExit, match="needs --mode pairwise"):
        script.load_data(script.TrainRewardConfig(pairs=str(pairs), mode="binned"))
    with pytest.raises(SystemExit, match="no such file"):
        script.load_data(script.TrainRewardConfig(pairs=str(tmp_path / "none.jsonl")))
