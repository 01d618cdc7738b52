"""Stage 3: tune the language model with PPO against the reward model (palm_rlhf/ppo.py).

    python train_ppo.py                   # runs/lm/final + runs/reward/final -> runs/ppo/final
    python train_ppo.py --resume          # continue a killed run where it stopped

Prompts are the first --prompt_words words of the held-out `prompts` split of the rated movie-review
snippets (palm_rlhf/data.py), which neither the LM nor the reward model was trained on; the last
--num_eval_prompts of them are kept out of PPO too and used for the before/after table. Besides the
reward model's score, every iteration logs the VADER sentiment of the sampled responses: a scorer no
model here was trained on, so it tells whether RL improved the real thing or only the learned reward.
Leaves runs/ppo/final (the policy with its adapters merged; PaLM.from_pretrained), metrics.csv and ppo.png.
"""
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from palm_rlhf import PaLM
from palm_rlhf.data import review_prompts, vader_compound
from palm_rlhf.ppo import RLHFTrainer, decode_responses, prompt_list
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import ByteTokenizer
from palm_rlhf.training import (
    GracefulStop,
    MetricsLogger,
    available_trackers,
    check_finite,
    checkpoint_exists,
    init_trackers,
    load_checkpoint,
    parse_config,
    plot_metrics,
    save_checkpoint,
    set_seed,
)


@dataclass
class TrainPPOConfig:
    """Tune a PaLM with PPO against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    lm_checkpoint: str = field(default="runs/lm/final", metadata={"help": "train_lm.py's final folder (the policy and the frozen reference)"})
    reward_checkpoint: str = field(default="runs/reward/final", metadata={"help": "train_reward.py's final folder, attached to the policy's base"})
    prompt_words: int = field(default=4, metadata={"help": "words of each held-out review snippet used as a prompt"})
    num_eval_prompts: int = field(default=32, metadata={"help": "prompts kept out of PPO for the before/after table"})
    iterations: int = field(default=50, metadata={"help": "PPO iterations (rollout batch + updates)"})
    rollout_batch_size: int = field(default=32, metadata={"help": "responses sampled per iteration and process"})
    minibatch_size: int = field(default=16, metadata={"help": "responses per PPO update"})
    epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    max_seq_len: int = field(default=128, metadata={"help": "prompt + response bytes (most review snippets end well within 128)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts (and of the policy's log-probs)"})
    actor_lr: float = field(default=1e-3, metadata={"help": "learning rate of the actor's LoRA"})
    critic_lr: float = field(default=1e-3, metadata={"help": "learning rate of the critic's LoRA and value head"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of actor and critic"})
    beta: float = field(default=0.05, metadata={"help": "KL penalty coefficient (initial value when adaptive)"})
    kl_target: float | None = field(default=None, metadata={"help": "target KL per response for an adaptive beta; none keeps beta fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller, in responses"})
    gamma: float = field(default=1.0, metadata={"help": "discount of GAE"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE"})
    eps_clip: float = field(default=0.2, metadata={"help": "clip range of the policy ratio"})
    value_clip: float = field(default=0.2, metadata={"help": "clip range of the value change"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    missing_eos_penalty: float | None = field(default=1.0, metadata={"help": "subtracted from the score of a response without EOS (none disables)"})
    rollout_memmap_dir: str | None = field(default=None, metadata={"help": "keep rollouts in memory-mapped files in this folder"})
    best_of: str = field(default="1,4,16", metadata={"help": "N of the best-of-N comparison at the end"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (Accelerate)"})
    checkpoint_every: int = field(default=10, metadata={"help": "iterations between resumable checkpoints"})
    out_dir: str = field(default="runs/ppo", metadata={"help": "run folder: checkpoint/, final/, metrics.csv, ppo.png"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and prompt order"})


def mean_vader(texts) -> float:
    """Mean VADER compound sentiment (-1..1) of `texts`."""
    return sum(vader_compound(texts)) / max(1, len(texts))


def load_models(cfg):
    for flag, path, script in (("lm_checkpoint", cfg.lm_checkpoint, "train_lm.py"),
                               ("reward_checkpoint", cfg.reward_checkpoint, "train_reward.py")):
        if not Path(path).is_dir():
            raise SystemExit(f"--{flag} {path}: no such folder; run {script} first")
    palm = PaLM.from_pretrained(cfg.lm_checkpoint)
    # the reward model's scope and head go onto the policy's base: one frozen base for all roles
    return palm, RewardModel.from_pretrained(cfg.reward_checkpoint, palm=palm)


@torch.no_grad()
def evaluate(trainer, prompts, cfg, num_samples=1, chunk=64) -> dict:
    """Best-of-`num_samples` responses of the current actor to each prompt, sampled at a fixed seed:
    their mean reward-model score and mean VADER sentiment, and one example."""
    generator = torch.Generator(trainer.device).manual_seed(cfg.seed)
    repeated = [p for p in prompts for _ in range(num_samples)]
    scores, texts = [], []
    for i in range(0, len(repeated), chunk):  # many prompts per batch: a batch of prompts at a time, not one by one
        seq, mask, start = trainer.sample(repeated[i : i + chunk], cfg.max_seq_len, cfg.temperature, generator=generator)
        scores.append(trainer.score(seq, mask, start).cpu())
        response_tokens = mask.clone()
        response_tokens[:, :start] = False
        texts += decode_responses(seq, response_tokens, trainer.tokenizer)
    scores = torch.cat(scores).view(len(prompts), num_samples)  # (prompts, N)
    best = scores.argmax(dim=1)
    best_texts = [texts[i * num_samples + int(j)] for i, j in enumerate(best)]
    return dict(score=scores.max(dim=1).values.mean().item(), vader=mean_vader(best_texts),
                example=trainer.tokenizer.decode(prompts[0][1:]) + best_texts[0])


def comparison_table(before, after, best_of) -> str:
    lines = [f"{'policy':<26} {'RM score':>9} {'VADER':>7}"]
    lines += [f"{'before PPO (the LM)':<26} {before[1]['score']:>9.3f} {before[1]['vader']:>7.3f}",
              f"{'after PPO':<26} {after['score']:>9.3f} {after['vader']:>7.3f}"]
    for n in best_of:
        lines.append(f"{f'best-of-{n}, before PPO':<26} {before[n]['score']:>9.3f} {before[n]['vader']:>7.3f}")
    return "\n".join(lines)


def train(cfg: TrainPPOConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    best_of = sorted({1, *(int(n) for n in cfg.best_of.split(",") if n.strip())})
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=available_trackers(), project_dir=str(out_dir))
    set_seed(cfg.seed)
    palm, reward_model = load_models(cfg)
    tokenizer = ByteTokenizer()
    texts = review_prompts(cfg.prompt_words)
    if len(texts) <= cfg.num_eval_prompts:
        raise SystemExit(f"only {len(texts)} prompts; lower --num_eval_prompts ({cfg.num_eval_prompts})")
    eval_prompts = prompt_list(None, texts[-cfg.num_eval_prompts:], tokenizer, palm.pad_id)
    trainer = RLHFTrainer(
        palm=palm, reward_model=reward_model, prompts=texts[: -cfg.num_eval_prompts], tokenizer=tokenizer,
        actor_lora_r=cfg.lora_r, critic_lora_r=cfg.lora_r, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
        beta=cfg.beta, kl_target=cfg.kl_target, kl_horizon=cfg.kl_horizon, gamma=cfg.gamma, lam=cfg.lam,
        eps_clip=cfg.eps_clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef, entropy_coef=cfg.entropy_coef,
        max_norm=cfg.max_grad_norm or None, epochs=cfg.epochs, minibatch_size=cfg.minibatch_size,
        missing_eos_penalty=cfg.missing_eos_penalty, rollout_memmap_dir=cfg.rollout_memmap_dir, accelerator=accelerator,
    )
    checkpoint_dir = out_dir / "checkpoint"
    start, before = 0, None
    if cfg.resume:
        if not checkpoint_exists(checkpoint_dir):
            raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir}; start without --resume")
        state = load_checkpoint(checkpoint_dir, model=trainer.actor_critic, optimizer=trainer.optimizer)
        start, trainer.kl.beta, before = state["step"], state["extra"]["beta"], state["extra"]["before"]
        before = {int(n): v for n, v in before.items()}
        accelerator.print(f"resumed at iteration {start}")
    init_trackers(accelerator, "palm_rlhf_ppo", asdict(cfg))
    metrics = MetricsLogger(out_dir, accelerator)
    if before is None:  # the actor starts equal to the LM: its samples are the "before" column
        before = {n: evaluate(trainer, eval_prompts, cfg, n) for n in best_of}
        metrics.log(0, eval_score=before[1]["score"], eval_vader=before[1]["vader"])
        accelerator.print(f"before PPO: RM score {before[1]['score']:.3f}, VADER {before[1]['vader']:.3f}; "
                          f"e.g. {before[1]['example']!r}")

    def save(iteration):
        save_checkpoint(checkpoint_dir, accelerator=accelerator, model=trainer.actor_critic, optimizer=trainer.optimizer,
                        step=iteration, extra=dict(beta=trainer.kl.beta, before=before), config=asdict(cfg))

    def log(iteration, stats, rollout):
        check_finite(stats["policy_loss"] + stats["value_loss"], iteration,
                     hint=f"stopped; the last good checkpoint in {checkpoint_dir} is intact")
        metrics.log(iteration + 1, **stats, vader=mean_vader(rollout.responses(tokenizer)))

    stop = GracefulStop()
    progress = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train_ppo",
                    disable=not accelerator.is_main_process)
    for iteration in progress:
        stats, rollout = trainer.step(cfg.max_seq_len, cfg.rollout_batch_size, cfg.temperature)
        log(iteration, stats, rollout)
        progress.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}", len=f"{stats['response_length']:.0f}")
        done = iteration + 1
        if stop.requested_on_any(accelerator):
            save(done)
            accelerator.print(f"\nstopped at iteration {done}; checkpoint in {checkpoint_dir}; continue with --resume")
            return {}
        if done % cfg.checkpoint_every == 0 and done < cfg.iterations:
            save(done)

    save(cfg.iterations)
    after = evaluate(trainer, eval_prompts, cfg)
    metrics.log(cfg.iterations, eval_score=after["score"], eval_vader=after["vader"])
    if accelerator.is_main_process:
        trainer.save_policy(out_dir / "final")
        plot_metrics(out_dir / "metrics.csv", out_dir / "ppo.png",
                     [["score", "eval_score"], ["kl"], ["vader", "eval_vader"], ["response_length"],
                      ["approx_kl", "clip_fraction", "explained_variance"]])
        print(f"\non {len(eval_prompts)} held-out prompts, sampled at seed {cfg.seed} (KL to the LM at the end: "
              f"{stats['kl'] if cfg.iterations > start else float('nan'):.3f} nats per response)")
        print(comparison_table(before, after, best_of))
        print(f"before: {before[1]['example']!r}\nafter:  {after['example']!r}")
        print(f"tuned policy in {out_dir / 'final'}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / 'ppo.png'}")
    return dict(before=before, after=after)


if __name__ == "__main__":
    train(parse_config(TrainPPOConfig, sys.argv[1:]))
