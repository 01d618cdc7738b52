"""Stage 3 without a critic: tune the language model with GRPO, Dr. GRPO or RLOO against the reward
model (palm_rlhf/grpo.py).

    python train_grpo.py                        # RLOO: runs/lm/final + runs/reward/final -> runs/grpo/final, ~3 min
    python train_grpo.py --estimator grpo --kl_in loss --beta 0.04 --out_dir runs/grpo_k3   # as DeepSeekMath
    python train_grpo.py --resume               # continue a killed run where it stopped

Each iteration samples --group_size responses to each of --prompts_per_step prompts; a response's
advantage is its score against the others of its group. The prompts, the held-out evaluation, the
VADER logging and the before/after table are train_ppo.py's (palm_rlhf/rl_stage.py).
Leaves runs/grpo/final (the policy with its adapters merged; PaLM.from_pretrained), metrics.csv and grpo.png.
"""
import sys
from dataclasses import dataclass, field


from palm_rlhf.grpo import GRPOTrainer, check_options
from palm_rlhf.rl_stage import RLStageConfig, load_models, run_rl_stage, split_prompts
from palm_rlhf.training import available_trackers, make_accelerator, parse_config, set_seed


@dataclass
class TrainGRPOConfig(RLStageConfig):
    """Tune a PaLM with group-relative, critic-free RL against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    estimator: str = field(default="rloo", metadata={"help": "advantage: rloo (r - mean of the others), grpo ((r - mean) / std) or dr_grpo (r - mean)"})
    group_size: int = field(default=8, metadata={"help": "responses sampled per prompt (G)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per iteration and process"})
    iterations: int = field(default=120, metadata={"help": "iterations (rollouts of prompts_per_step x group_size + updates)"})
    minibatch_size: int = field(default=16, metadata={"help": "responses per update"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the policy's LoRA"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the policy"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    beta: float = field(default=0.2, metadata={"help": "KL coefficient; 0 skips the reference model entirely"})
    kl_in: str = field(default="reward", metadata={"help": "loss (k3 per token, as GRPO) or reward (k1 per response subtracted from the score, as PPO)"})
    loss_aggregation: str = field(default="token", metadata={"help": "token (mean over the batch's tokens, DAPO), sequence (mean of per-response means, GRPO) or constant (sum / responses x budget, Dr. GRPO)"})
    eps_clip: float = field(default=0.2, metadata={"help": "clip range of the policy ratio (lower side, and upper unless eps_clip_high)"})
    eps_clip_high: float | None = field(default=None, metadata={"help": "upper clip range (DAPO's clip-higher, e.g. 0.28); none = eps_clip"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted from the score of a response without EOS (none disables)"})
    best_of: str = field(default="1,4", metadata={"help": "N of the best-of-N comparison at the end (evaluate.py draws the whole curve)"})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, fp16 or bf16; by default what accelerate launch was given (--mixed_precision, its config), else no"})
    checkpoint_every: int = field(default=10, metadata={"help": "iterations between resumable checkpoints"})
    out_dir: str = field(default="runs/grpo", metadata={"help": "run folder: checkpoint/, final/, metrics.csv, grpo.png"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and prompt order"})


def train(cfg: TrainGRPOConfig) -> dict:
    try:
        check_options(cfg.estimator, cfg.group_size, cfg.beta, cfg.kl_in, cfg.loss_aggregation)
    except ValueError as error:
        raise SystemExit(f"train_grpo.py: {error}") from None
    accelerator = make_accelerator(cfg.minibatch_size, cfg.max_grad_norm, mixed_precision=cfg.mixed_precision,
                                   log_with=available_trackers(), project_dir=cfg.out_dir)
    set_seed(cfg.seed)
    palm, reward_model = load_models(cfg)
    tokenizer = palm.tokenizer  # saved with the LM: bytes, or the BPE it was trained with
    train_prompts, eval_prompts = split_prompts(cfg, tokenizer, palm.pad_id)
    trainer = GRPOTrainer(
        palm=palm, reward_model=reward_model, prompts=train_prompts, tokenizer=tokenizer,
        estimator=cfg.estimator, group_size=cfg.group_size, beta=cfg.beta, kl_in=cfg.kl_in,
        loss_aggregation=cfg.loss_aggregation, eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, lr=cfg.lr,
        lora_r=cfg.lora_r, weight_decay=cfg.weight_decay, epochs=cfg.epochs, minibatch_size=cfg.minibatch_size,
        max_norm=cfg.max_grad_norm or None, missing_eos_penalty=cfg.missing_eos_penalty, seed=cfg.seed,
        accelerator=accelerator,
    )
    return run_rl_stage(
        cfg, trainer, accelerator=accelerator, model=trainer.actor, stage="grpo", method=cfg.estimator.upper(),
        eval_prompts=eval_prompts, step=lambda: trainer.step(cfg.max_seq_len, cfg.prompts_per_step, cfg.temperature),
        plot_panels=[["score", "eval_score"], ["kl"], ["vader", "eval_vader"], ["response_length"],
                     ["approx_kl", "clip_fraction", "zero_variance_groups"]],
    )


if __name__ == "__main__":
    train(parse_config(TrainGRPOConfig, sys.argv[1:]))
