"""Stage 2: train a reward model on real human ratings (the VADER paper's rated movie-review snippets).

    python train_reward.py                      # Bradley-Terry on pairs of rated snippets, on runs/lm/final
    python train_reward.py --mode binned        # 1-5 star classifier (lucidrains' num_binned_output=5)
    python train_reward.py --resume             # continue a killed run where it stopped

Leaves runs/reward/final (RewardModel.from_pretrained), which train_ppo.py loads onto its policy's
base. Data (palm_rlhf/data.py): the snippets' `train` split is trained on; `test` is held out for
the metrics below; `prompts` (the snippets whose first words prompt PPO) is never seen. A plain
snippet is split into prompt (its first --prompt_words words) and response (the rest), the split
PPO gives the reward model. Pairs: two snippets whose human means differ by >= --pair_margin, the
higher one chosen; pairwise training uses every such pair within each batch of --batch_size rated
snippets (InstructGPT's all-comparisons batching), a JSONL of pairs its pairs as given. Held-out metrics: binned accuracy and mean absolute rating error (binned mode,
beside the majority class), Pearson r with the human means, and pairwise accuracy on held-out
pairs beside the VADER lexicon's (ties count half for both).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palm_rlhf.config import SettingError, parse_config, setting
from palm_rlhf.data import (
    RATED_SETS,
    RatedText,
    bin_rating,
    load_rated_snippets,
    make_preference_pairs,
    read_jsonl,
    read_pairs,
    read_ratings,
    split_snippets,
    stable_bucket,
    corrupt_text,
    truncate_words,
    vader_compound,
)
from palm_rlhf.model import PRESETS
from palm_rlhf.reward import (
    RewardConfig, RewardModel, all_pairs_bradley_terry_loss, bradley_terry_loss, encode_reward_input, expected_rating,
    pad_right, preference_accuracy, score_texts, split_prompt,
)
from palm_rlhf.training import Run, RunConfig, load_lm, lr_lambda_warmup_cosine, script_accelerator

PLOT = [["train_loss", "test_loss"], ["test_pairwise_acc", "vader_pairwise_acc"], ["test_pearson_r"],
        ["test_binned_acc", "majority_binned_acc"], ["test_mae", "majority_mae"], ["lr"]]


@dataclass
class TrainRewardConfig(RunConfig, RewardConfig):
    """Train a reward model (PaLM + LoRA + head) on human ratings; checkpoints resume; metrics go to CSV and a plot."""

    lm_checkpoint: str = setting("runs/lm/final", "train_lm.py's final folder, or 'none' for a fresh PaLM of --preset")
    preset: str = setting("small", "model size when --lm_checkpoint is none", choices=tuple(PRESETS))
    data: str = setting("movieReviewSnippets", f"VADER rated sets joined by + ({', '.join(RATED_SETS)}; held-out metrics on the first) or a .jsonl of {{prompt, response, rating}} or {{prompt, chosen, rejected}}")
    pairs: str = setting("", "a .jsonl of {prompt, chosen, rejected} (the feedback app's export) trained on in full beside --data's rated texts, a batch of each per step")
    prompt_words: int = setting(4, "words of a plain snippet used as its prompt (as review_prompts)", at_least=1)
    pair_margin: float = setting(1.0, "least difference of ratings for a derived preference pair", above=0)
    loss_margin: float = setting(0.0, "margin inside the Bradley-Terry loss (Llama 2)", at_least=0)
    max_len: int = setting(256, "tokens per sequence (bytes with the byte tokenizer); longer responses are cut, EOS kept", at_least=4)
    truncate_prob: float = setting(0.0, "share of training responses cut after a random word, without the closing EOS (as RL's unfinished samples)", at_least=0, at_most=1)
    corrupt_prob: float = setting(0.0, "pairwise mode on rated texts: share of a batch's texts also given as a corrupted copy ranked below its original", at_least=0, at_most=1)
    batch_size: int = setting(32, "rated texts (or given pairs) per process per micro-batch", at_least=2)
    grad_accum: int = setting(1, "micro-batches per optimizer step", at_least=1)
    steps: int = setting(400, "optimizer steps", at_least=1)
    lr: float = setting(1e-3, "peak learning rate", above=0)
    warmup_steps: int = setting(30, "linear warm-up steps", at_least=0)
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak (cosine decay)", at_least=0, at_most=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", at_least=0)
    eval_every: int = setting(200, "steps between held-out evaluations", at_least=1)
    max_test: int | None = setting(None, "cap on held-out ratings and pairs evaluated (quick checks)", at_least=1)
    out_dir: str = setting("runs/reward", "run folder: checkpoint/, final/, metrics.csv, reward.png")
    seed: int = setting(0, "seed for the head, data order and pairing")


# ---------------------------------------------------------------------------------------------------
# data: ratings are dict(prompt, response, stars (1..K or None), mean); pairs dict(chosen, rejected)
# with each side a (prompt, response)


def vader_set_data(cfg) -> dict:
    """The train splits of every set named in --data (all rated on the same -4..4 scale); the test split of
    the first, so that held-out figures compare across mixes. The `prompts` splits are never used here."""
    splits = [split_snippets(load_rated_snippets(name)) for name in cfg.data.split("+")]

    def ratings(snippets):
        return [dict(zip(("prompt", "response"), split_prompt(s.text, cfg.prompt_words)),
                     stars=bin_rating(s.mean, cfg.num_bins), mean=s.mean) for s in snippets]

    test_ratings = ratings(splits[0]["test"])
    # pairwise training forms its pairs inside each batch of rated texts: no fixed training pairs
    return dict(train_ratings=[r for split in splits for r in ratings(split["train"])], test_ratings=test_ratings,
                train_pairs=[], test_pairs=pairs_from_ratings(test_ratings, cfg.pair_margin, cfg.seed))


def pairs_from_ratings(ratings, margin, seed) -> list:
    """Preference pairs among rated records, paired by data.make_preference_pairs (the record's index
    stands in for its text)."""
    rated = [RatedText(str(i), float(r["mean"]), str(i)) for i, r in enumerate(ratings)]
    side = lambda i: (ratings[int(i)]["prompt"], ratings[int(i)]["response"])  # noqa: E731
    return [dict(chosen=side(p["chosen"]), rejected=side(p["rejected"]))
            for p in make_preference_pairs(rated, margin=margin, seed=seed)]


def jsonl_data(cfg) -> dict:
    """Ratings or pairs from a JSONL file; ~10% held out by a stable hash of each record."""
    path = Path(cfg.data)
    first = read_jsonl(path)[:1]
    if first and "rating" in first[0]:
        records = read_ratings(path)
        ratings = [dict(prompt=r["prompt"], response=r["response"], mean=r["rating"],
                        stars=int(r["rating"]) if r["rating"] == int(r["rating"]) else None) for r in records]
        if cfg.mode == "binned" and any(r["stars"] is None or not 1 <= r["stars"] <= cfg.num_bins for r in ratings):
            raise SystemExit(f"{path}: binned mode needs integer ratings in 1..{cfg.num_bins} (see --num_bins)")
        held_out = [stable_bucket(r["prompt"] + "\n" + r["response"], 10) == 0 for r in ratings]
        train = [r for r, h in zip(ratings, held_out) if not h]
        test = [r for r, h in zip(ratings, held_out) if h]
        return dict(train_ratings=train, test_ratings=test, train_pairs=[],
                    test_pairs=pairs_from_ratings(test, cfg.pair_margin, cfg.seed))
    if first and "chosen" in first[0]:
        if cfg.mode == "binned":
            raise SystemExit(f"{path} holds preference pairs; binned mode needs ratings: use --mode pairwise")
        pairs = [dict(chosen=(p["prompt"], p["chosen"]), rejected=(p["prompt"], p["rejected"])) for p in read_pairs(path)]
        held_out = [stable_bucket("\n".join((*p["chosen"], p["rejected"][1])), 10) == 0 for p in pairs]
        return dict(train_ratings=[], test_ratings=[], train_pairs=[p for p, h in zip(pairs, held_out) if not h],
                    test_pairs=[p for p, h in zip(pairs, held_out) if h])
    raise SystemExit(f"{path}: expected JSONL lines with prompt, response, rating or prompt, chosen, rejected")


def collected_pairs(cfg) -> list:
    """Every pair of --pairs, none held out: each answer people gave is trained on."""
    if cfg.mode != "pairwise":
        raise SystemExit("--pairs holds preference pairs: it needs --mode pairwise")
    if not Path(cfg.pairs).is_file():
        raise SystemExit(f"--pairs {cfg.pairs}: no such file")
    return [dict(chosen=(p["prompt"], p["chosen"]), rejected=(p["prompt"], p["rejected"])) for p in read_pairs(cfg.pairs)]


def load_data(cfg) -> dict:
    if cfg.corrupt_prob and cfg.mode != "pairwise":
        raise SystemExit("--corrupt_prob ranks corrupted copies below their originals: it needs --mode pairwise")
    if all(name in RATED_SETS for name in cfg.data.split("+")):
        data = vader_set_data(cfg)
    elif cfg.data.endswith(".jsonl") and Path(cfg.data).is_file():
        data = jsonl_data(cfg)
    else:
        raise SystemExit(f"--data {cfg.data!r}: expected one of {', '.join(RATED_SETS)} or an existing .jsonl file")
    if not (data["train_ratings"] or (cfg.mode == "pairwise" and data["train_pairs"])):
        raise SystemExit(f"--data {cfg.data}: no training {'ratings' if cfg.mode == 'binned' else 'ratings or pairs'} for --mode {cfg.mode}")
    if cfg.pairs:
        data["train_pairs"] = data["train_pairs"] + collected_pairs(cfg)
    if cfg.max_test is not None:  # evenly spaced, since the files are ordered by rating
        for key in ("test_ratings", "test_pairs"):
            data[key] = data[key][:: max(1, len(data[key]) // cfg.max_test)][: cfg.max_test]
    return data


def collate(sides, palm, max_len, device, ended=None) -> tuple:
    """(prompt, response) pairs -> right-padded seq, prompt_mask, mask on `device`, in the tokens of
    `palm`'s tokenizer; `ended[i]` False leaves out the closing EOS of side i."""
    ended = ended or [True] * len(sides)
    encoded = [encode_reward_input(*side, max_len=max_len, ended=e, tokenizer=palm.tokenizer) for side, e in zip(sides, ended)]
    return tuple(t.to(device) for t in pad_right(*zip(*encoded), pad_id=palm.pad_id))


def augmented_sides(batch, cfg, rng) -> tuple:
    """The batch's (prompt, response) sides, a --truncate_prob share of responses cut short and left
    without their EOS; and a --corrupt_prob share of them corrupted: (sides, ended, corrupted copies of sides[:m])."""
    sides, ended = [], []
    for r in batch:
        cut = rng.random() < cfg.truncate_prob
        sides.append((r["prompt"], truncate_words(r["response"], rng) if cut else r["response"]))
        ended.append(not cut)
    m = int(round(cfg.corrupt_prob * len(batch)))
    return sides, ended, [(prompt, corrupt_text(response, rng)) for prompt, response in sides[:m]]


def sample_batch(items, batch_size, step, seed, rank) -> list:
    """The batch depends only on (seed, step, rank), so a resumed run draws what an uninterrupted one would."""
    rng = np.random.default_rng([seed, step, rank])
    return [items[i] for i in rng.integers(0, len(items), size=batch_size)]


# ---------------------------------------------------------------------------------------------------
# evaluation


def vader_pairwise_accuracy(pairs) -> float:
    """The VADER lexicon's pairwise accuracy (compound score of prompt + response), the baseline."""
    chosen = vader_compound(["".join(p["chosen"]) for p in pairs])
    rejected = vader_compound(["".join(p["rejected"]) for p in pairs])
    return preference_accuracy(torch.tensor(chosen), torch.tensor(rejected)).item()


def majority_baseline(data) -> dict:
    """The majority class of the training ratings: its held-out accuracy and mean absolute error."""
    stars = torch.tensor([r["stars"] for r in data["test_ratings"]], dtype=torch.float)
    majority = max(set(r["stars"] for r in data["train_ratings"]), key=[r["stars"] for r in data["train_ratings"]].count)
    return dict(binned_acc=(stars == majority).float().mean().item(), mae=(stars - majority).abs().mean().item())


def evaluate(model, data, cfg, device) -> dict:
    binned = model.num_binned_output > 0
    metrics = {}
    if data["test_ratings"]:
        outputs = score_texts(model, [(r["prompt"], r["response"]) for r in data["test_ratings"]], cfg.batch_size, cfg.max_len, return_logits=True)
        rewards = expected_rating(outputs) if binned else outputs
        means = torch.tensor([float(r["mean"]) for r in data["test_ratings"]])
        metrics["pearson_r"] = torch.corrcoef(torch.stack((rewards, means)))[0, 1].item()
        if binned:
            stars = torch.tensor([r["stars"] for r in data["test_ratings"]])
            metrics["binned_acc"] = (outputs.argmax(dim=-1) + 1 == stars).float().mean().item()
            metrics["mae"] = (rewards - stars).abs().mean().item()
            metrics["loss"] = torch.nn.functional.cross_entropy(outputs, stars - 1).item()
    if data["test_pairs"]:
        chosen = score_texts(model, [p["chosen"] for p in data["test_pairs"]], cfg.batch_size, cfg.max_len, return_logits=True)
        rejected = score_texts(model, [p["rejected"] for p in data["test_pairs"]], cfg.batch_size, cfg.max_len, return_logits=True)
        if binned:
            chosen, rejected = expected_rating(chosen), expected_rating(rejected)
        else:
            metrics["loss"] = bradley_terry_loss(chosen, rejected).item()
        metrics["pairwise_acc"] = preference_accuracy(chosen, rejected).item()
    return {f"test_{k}": v for k, v in metrics.items()}


def print_table(metrics, baselines, print_fn) -> None:
    rows = [("held-out pairwise accuracy", "test_pairwise_acc", "vader_pairwise_acc", "VADER lexicon"),
            ("binned accuracy", "test_binned_acc", "majority_binned_acc", "majority class"),
            ("mean absolute rating error", "test_mae", "majority_mae", "majority class"),
            ("Pearson r with human means", "test_pearson_r", None, "")]
    print_fn(f"{'metric':<28} {'reward model':>12}   baseline")
    for name, key, baseline_key, baseline_name in rows:
        if key in metrics:
            baseline = f"{baselines[baseline_key]:.3f} ({baseline_name})" if baseline_key in baselines else ""
            print_fn(f"{name:<28} {metrics[key]:>12.3f}   {baseline}")


# ---------------------------------------------------------------------------------------------------
# training


def build_model(cfg) -> RewardModel:
    try:
        return RewardModel.from_config(load_lm(cfg.lm_checkpoint, preset=cfg.preset), cfg)
    except SettingError as error:  # a setting that does not fit the model it is read from
        raise SystemExit(f"train_reward.py: --{error.name} {error.value}: {error.reason}") from None


def training_loss(model, palm, data, cfg, step, rank, device) -> torch.Tensor:
    """`model`: the reward model as prepared by Accelerate; `palm`: its base, for the tokenizer."""
    rng = np.random.default_rng([cfg.seed, step, rank, 1])  # augmentation, reproducible like the batch
    if cfg.mode == "binned":
        batch = sample_batch(data["train_ratings"], cfg.batch_size, step, cfg.seed, rank)
        sides, ended, _ = augmented_sides(batch, cfg, rng)
        seq, prompt_mask, mask = collate(sides, palm, cfg.max_len, device, ended)
        labels = torch.tensor([r["stars"] - 1 for r in batch], device=device)  # class indices 0..K-1
        return model(seq, mask=mask, prompt_mask=prompt_mask, labels=labels)
    # one forward pass over every text of the step (rated texts, corrupted copies, given pairs), so DDP sees a single call
    sides, ended, rated, corrupted = [], [], [], []
    if data["train_ratings"]:  # every pair of the batch's rated texts at least --pair_margin apart
        rated = sample_batch(data["train_ratings"], cfg.batch_size, step, cfg.seed, rank)
        sides, ended, corrupted = augmented_sides(rated, cfg, rng)
        sides, ended = sides + corrupted, ended + ended[: len(corrupted)]
    pairs = sample_batch(data["train_pairs"], cfg.batch_size, step, cfg.seed, rank) if data["train_pairs"] else []
    sides = sides + [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    seq, prompt_mask, mask = collate(sides, palm, cfg.max_len, device, ended + [True] * 2 * len(pairs))
    rewards = model(seq, mask=mask, prompt_mask=prompt_mask)
    loss = 0.0
    if rated:
        ratings = torch.tensor([float(r["mean"]) for r in rated], device=device)
        loss = all_pairs_bradley_terry_loss(rewards[: len(rated)], ratings, min_gap=cfg.pair_margin, margin=cfg.loss_margin)
    if corrupted:  # each original above its corrupted copy
        originals, copies = rewards[: len(corrupted)], rewards[len(rated) : len(rated) + len(corrupted)]
        loss = loss + bradley_terry_loss(originals, copies, margin=cfg.loss_margin)
    if pairs:
        chosen, rejected = rewards[len(rated) + len(corrupted) :].chunk(2)
        loss = loss + bradley_terry_loss(chosen, rejected, margin=cfg.loss_margin)
    return loss


def train(cfg: TrainRewardConfig) -> dict:
    """The whole run, in order (data, model, baselines, the loop, the end), so that a reader sees the loop."""
    out_dir = Path(cfg.out_dir)
    accelerator = script_accelerator(cfg, cfg.batch_size)
    data = load_data(cfg)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.finetune_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # stepped once per optimizer step, not handed to accelerator.prepare (as in train_lm.py)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    run = Run(cfg, accelerator, name="reward", total=cfg.steps, model=model, optimizer=optimizer, scheduler=scheduler)

    baselines = {}
    if data["test_pairs"]:
        baselines["vader_pairwise_acc"] = vader_pairwise_accuracy(data["test_pairs"])
    if cfg.mode == "binned" and data["test_ratings"]:
        baselines.update({f"majority_{k}": v for k, v in majority_baseline(data).items()})
    trainable = sum(p.numel() for p in unwrapped.finetune_parameters())
    accelerator.print(f"{cfg.mode} reward model: {trainable / 1e3:.1f}k trainable of {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M "
                      f"parameters; {len(data['train_ratings'])} train / {len(data['test_ratings'])} held-out ratings, "
                      f"{len(data['train_pairs'])} train / {len(data['test_pairs'])} held-out pairs; baselines {baselines}")
    if cfg.mode == "pairwise" and data["train_ratings"]:
        accelerator.print(f"pairwise training: every pair of each batch's {cfg.batch_size} rated texts whose ratings differ by >= {cfg.pair_margin}")

    final = None
    for step in run:
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(model):
                loss = training_loss(model, unwrapped.palm, data, cfg, step * cfg.grad_accum + micro, accelerator.process_index,
                                     accelerator.device)
                mean_loss = accelerator.reduce(loss.detach(), "mean")
                run.check_loss(mean_loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unwrapped.finetune_parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        run.log(step + 1, train_loss=mean_loss, lr=scheduler.get_last_lr()[0])
        run.postfix(loss=mean_loss)

        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            # every process evaluates the whole held-out split: the same numbers everywhere, no gathering
            held_out = evaluate(unwrapped, data, cfg, accelerator.device)
            run.log(done, **held_out, **baselines)
            run.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
            final = held_out if done == cfg.steps else None

    final = final or evaluate(unwrapped, data, cfg, accelerator.device)
    logged = set(final) | set(baselines) | {"train_loss", "lr"}
    run.plot_panels = [p for p in PLOT if logged & set(p)]

    def save_final(directory):
        if accelerator.is_main_process:
            unwrapped.save(directory)
            (out_dir / "final_metrics.json").write_text(json.dumps(dict(**final, **baselines), indent=2))

    run.finish(save_final)
    if accelerator.is_main_process:
        print_table(final, baselines, print)
        print(f"final reward model in {out_dir / 'final'}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / 'reward.png'}")
    return dict(**final, **baselines)


if __name__ == "__main__":
    train(parse_config(TrainRewardConfig))
