"""RL from a verifiable reward: GRPO raises held-out pass@k on a task with an exact scorer.

    python train_verifiable.py                    # SFT, GRPO, pass@k before and after -> runs/verifiable
    python train_verifiable.py --grpo_steps 200   # a rerun reuses the fine-tuned model in runs/verifiable/sft

The task is addition written as bytes, "37+48=" -> "85" (palm_rlhf/tasks.py). Three stages:

    a) supervised fine-tuning (SFT) of a PaLM on formatted problems of the train split, learning only
       the answer tokens, stopped early on purpose: held-out pass@1 above zero but far from solved;
    b) GRPO on prompts of the train split, the exact scorer (1 if the answer is right, else 0) the
       only reward;
    c) pass@1 and pass@k (Chen et al. 2021's unbiased estimator) on held-out problems, which share
       no operand pair with the train split (in either order), before and after GRPO, with standard
       errors over problems; greedy accuracy beside them.

Held-out pass@k is also measured on a small fixed set every --eval_every steps of both stages, so
the plot shows one curve through SFT and GRPO (the x axis counts SFT steps, then GRPO steps).
Leaves runs/verifiable/sft (the fine-tuned PaLM, reused by a rerun with the same SFT settings),
runs/verifiable/final (the GRPO policy, adapters merged), metrics.csv and verifiable.png.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palm_rlhf import PaLM
from palm_rlhf.grpo import GRPOTrainer
from palm_rlhf.tasks import (
    addition_problems,
    answer_loss,
    count_correct,
    encode_examples,
    mean_pass_at_k,
    verifiable_reward_fn,
)
from palm_rlhf.config import parse_config
from palm_rlhf.training import MetricsLogger, check_finite, load_lm, lr_lambda_warmup_cosine, make_accelerator, plot_metrics, set_seed

SFT_FIELDS = ("lm_checkpoint", "preset", "digits", "num_train_problems", "sft_steps", "sft_batch_size", "sft_lr",
              "sft_warmup_steps", "seed")


@dataclass
class TrainVerifiableConfig:
    """SFT a PaLM on addition, then GRPO with the exact scorer as the only reward; held-out pass@k before and after."""

    digits: int = field(default=2, metadata={"help": "digits of each operand: 2 gives problems like 37+48="})
    lm_checkpoint: str | None = field(default=None, metadata={"help": "a PaLM folder to fine-tune (e.g. runs/lm/final); none trains --preset from scratch"})
    preset: str = field(default="tiny", metadata={"help": "model size when training from scratch: tiny, small, ..."})
    num_train_problems: int = field(default=4000, metadata={"help": "problems of the train split that SFT and GRPO draw from"})
    sft_steps: int = field(default=600, metadata={"help": "SFT steps: few enough that held-out pass@1 stays far from 1"})
    sft_batch_size: int = field(default=64, metadata={"help": "problems per SFT step"})
    sft_lr: float = field(default=3e-3, metadata={"help": "peak learning rate of SFT (warm-up, then cosine decay)"})
    sft_warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps of SFT"})
    grpo_steps: int = field(default=2000, metadata={"help": "GRPO steps (rollouts of prompts_per_step x group_size, then updates)"})
    prompts_per_step: int = field(default=16, metadata={"help": "problems per GRPO step"})
    group_size: int = field(default=8, metadata={"help": "responses sampled per problem: the group of GRPO's advantage"})
    estimator: str = field(default="grpo", metadata={"help": "advantage estimator of the GRPO trainer"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the SFT model, fixed (0: no reference pass)"})
    grpo_lr: float = field(default=1e-3, metadata={"help": "learning rate of GRPO's LoRA"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the GRPO policy"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    minibatch_size: int = field(default=64, metadata={"help": "responses per GRPO update"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO's dynamic sampling: problems whose samples are all right or all wrong give way to newly drawn ones"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts and of pass@k"})
    num_eval_problems: int = field(default=256, metadata={"help": "held-out problems of the before/after table"})
    eval_samples: int = field(default=16, metadata={"help": "samples per held-out problem (n of the pass@k estimator)"})
    pass_at: str = field(default="1,8", metadata={"help": "k of the pass@k rows, each at most eval_samples"})
    eval_every: int = field(default=100, metadata={"help": "steps between the small held-out evaluations of the plot"})
    num_curve_problems: int = field(default=64, metadata={"help": "held-out problems of those evaluations (8 samples each)"})
    out_dir: str = field(default="runs/verifiable", metadata={"help": "run folder: sft/, final/, metrics.csv, verifiable.png"})
    seed: int = field(default=0, metadata={"help": "seed of weights, batches and sampling"})


def max_new_tokens(cfg) -> int:
    return cfg.digits + 3  # the longest answer (digits + 1), its EOS, one byte to spare


def pass_at_k_table(problems, palm, cfg, ks, accelerator) -> dict:
    """{"pass@k": (mean, stderr), ..., "greedy": (mean, stderr)} on `problems`, sampled at a fixed seed."""
    palm.eval()
    correct = count_correct(palm.to(accelerator.device), problems, cfg.eval_samples, cfg.temperature,
                            max_new_tokens(cfg), seed=cfg.seed)
    greedy = count_correct(palm, problems, 1, 0.0, max_new_tokens(cfg))
    table = {f"pass@{k}": mean_pass_at_k(correct, cfg.eval_samples, k) for k in ks}
    return {**table, "greedy": mean_pass_at_k(greedy, 1, 1)}


def curve_point(palm, problems, cfg) -> dict:
    """Held-out pass@1 and pass@8 from 8 samples per problem: the points of the plot's curve."""
    palm.eval()
    correct = count_correct(palm, problems, 8, cfg.temperature, max_new_tokens(cfg), seed=cfg.seed)
    return {"heldout_pass@1": mean_pass_at_k(correct, 8, 1)[0], "heldout_pass@8": mean_pass_at_k(correct, 8, 8)[0]}


def sft_settings_file(out_dir) -> Path:
    """Written beside the SFT model once it is saved: its presence means a later run reuses it."""
    return Path(out_dir) / "sft" / "sft_settings.json"


def load_or_train_sft(cfg, train_problems, curve_problems, metrics, accelerator) -> PaLM:
    """Stage a): the SFT model, read from out_dir/sft when a run with the same SFT settings left it."""
    settings_file = sft_settings_file(cfg.out_dir)
    sft_dir = settings_file.parent
    settings = {name: getattr(cfg, name) for name in SFT_FIELDS}
    if settings_file.is_file():
        saved = json.loads(settings_file.read_text())
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise SystemExit(f"{sft_dir} was fine-tuned with other settings ({', '.join(changed)}); "
                             f"delete it or choose another --out_dir")
        print(f"reusing the fine-tuned model in {sft_dir}")
        return PaLM.from_pretrained(sft_dir).to(accelerator.device)

    palm = load_lm(cfg.lm_checkpoint or "none", preset=cfg.preset, needs_tokenizer=False)
    palm.to(accelerator.device)
    optimizer = torch.optim.AdamW(palm.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_warmup_cosine(cfg.sft_warmup_steps, cfg.sft_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    progress = tqdm(range(1, cfg.sft_steps + 1), desc="SFT")
    for step in progress:
        palm.train()
        index = torch.randint(len(train_problems), (cfg.sft_batch_size,), generator=generator)
        seq, answer_mask = encode_examples([train_problems[i] for i in index])
        loss = answer_loss(palm, seq.to(accelerator.device), answer_mask.to(accelerator.device))
        check_finite(loss, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(palm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        metrics.log(step, sft_loss=loss.detach())
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.sft_steps:
            metrics.log(step, **curve_point(palm, curve_problems, cfg))
    palm.save(sft_dir)
    settings_file.write_text(json.dumps(settings, indent=2))
    return palm


def train_grpo(palm, cfg, train_problems, curve_problems, metrics, accelerator) -> PaLM:
    """Stage b): GRPO on the train split's prompts; the exact scorer is the only reward."""
    trainer = GRPOTrainer(
        palm=palm, reward_fn=verifiable_reward_fn(train_problems), prompts=[p.prompt for p in train_problems],
        estimator=cfg.estimator, group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step, beta=cfg.beta,
        kl_target=None, kl_in="loss", lr=cfg.grpo_lr, lora_r=cfg.lora_r, epochs=cfg.epochs, minibatch_size=cfg.minibatch_size,
        dynamic_sampling=cfg.dynamic_sampling, temperature=cfg.temperature, max_grad_norm=1.0, seed=cfg.seed, accelerator=accelerator,
    )
    max_seq_len = max(len(p.prompt) for p in train_problems) + 1 + max_new_tokens(cfg)  # + 1: the leading EOS
    progress = tqdm(range(1, cfg.grpo_steps + 1), desc="GRPO")
    for step in progress:
        stats, _ = trainer.step(max_seq_len=max_seq_len, prompts_per_step=cfg.prompts_per_step,
                                temperature=cfg.temperature)
        metrics.log(cfg.sft_steps + step, **stats)
        progress.set_postfix({k: f"{stats[k]:.3f}" for k in ("score", "kl", "extra_samples") if k in stats})
        if step % cfg.eval_every == 0 or step == cfg.grpo_steps:
            metrics.log(cfg.sft_steps + step, **curve_point(trainer.policy(), curve_problems, cfg))
    return trainer.policy()


def comparison_table(before, after, cfg) -> str:
    lines = [f"held-out: {cfg.num_eval_problems} problems x {cfg.eval_samples} samples at temperature "
             f"{cfg.temperature} (greedy: 1 each); mean +- standard error over problems",
             f"{'':<8} {'after SFT':>16} {'after GRPO':>16}"]
    for name in before:
        cells = [f"{mean:.3f} +- {stderr:.3f}" for mean, stderr in (before[name], after[name])]
        lines.append(f"{name:<8} {cells[0]:>16} {cells[1]:>16}")
    return "\n".join(lines)


def train(cfg: TrainVerifiableConfig) -> dict:
    if cfg.digits < 1:
        raise SystemExit(f"--digits {cfg.digits}: operands need at least one digit")
    ks = sorted({int(k) for k in cfg.pass_at.split(",") if k.strip()})
    if not ks or ks[0] < 1 or ks[-1] > cfg.eval_samples:
        raise SystemExit(f"--pass_at {cfg.pass_at}: each k must be in 1..eval_samples ({cfg.eval_samples})")
    started = time.time()
    out_dir = Path(cfg.out_dir)
    accelerator = make_accelerator(cfg.minibatch_size, max_grad_norm=1.0)
    set_seed(cfg.seed)
    train_problems = addition_problems("train", cfg.num_train_problems, cfg.digits, cfg.seed)
    heldout = addition_problems("heldout", cfg.num_eval_problems, cfg.digits, cfg.seed)
    curve_problems = heldout[: cfg.num_curve_problems]
    metrics = MetricsLogger(out_dir, resume=sft_settings_file(out_dir).is_file())  # a reused SFT model keeps its rows

    palm = load_or_train_sft(cfg, train_problems, curve_problems, metrics, accelerator)
    before = pass_at_k_table(heldout, palm, cfg, ks, accelerator)
    print(f"after SFT: held-out pass@1 {before['pass@1'][0]:.3f}")
    policy = train_grpo(palm, cfg, train_problems, curve_problems, metrics, accelerator)
    after = pass_at_k_table(heldout, policy, cfg, ks, accelerator)

    policy.save(out_dir / "final")
    plot_metrics(out_dir / "metrics.csv", out_dir / "verifiable.png",
                 [["sft_loss"], ["score"], ["heldout_pass@1", "heldout_pass@8"], ["kl"]])
    print(comparison_table(before, after, cfg))
    print(f"GRPO policy in {out_dir / 'final'}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / 'verifiable.png'}; "
          f"{time.time() - started:.0f} s in all")
    return dict(before=before, after=after)


if __name__ == "__main__":
    train(parse_config(TrainVerifiableConfig, sys.argv[1:]))
