"""Stage 3: tune the language model with PPO against the reward model (palm_rlhf/ppo.py).

    python train_ppo.py                   # runs/lm/final + runs/reward/final -> runs/ppo/final, ~4 min
    python train_ppo.py --resume          # continue a killed run where it stopped

Prompts are the first --prompt_words words of the held-out `prompts` split of the rated movie-review
snippets (palm_rlhf/data.py), which neither the LM nor the reward model was trained on; the last
--num_eval_prompts of them are kept out of PPO too and used for the before/after table. Besides the
reward model's score, every iteration logs the VADER sentiment of the sampled responses: a scorer no
model here was trained on, so it tells whether RL improved the real thing or only the learned reward.
Leaves runs/ppo/final (the policy with its adapters merged; PaLM.from_pretrained), metrics.csv and ppo.png.
"""
import sys
from dataclasses import dataclass, field


from palm_rlhf.ppo import RLHFTrainer
from palm_rlhf.rl_stage import RLStageConfig, load_models, run_rl_stage, split_prompts
from palm_rlhf.training import available_trackers, make_accelerator, parse_config, set_seed


@dataclass
class TrainPPOConfig(RLStageConfig):
    """Tune a PaLM with PPO against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    iterations: int = field(default=150, metadata={"help": "PPO iterations (rollout batch + updates)"})
    rollout_batch_size: int = field(default=32, metadata={"help": "responses sampled per iteration and process"})
    minibatch_size: int = field(default=16, metadata={"help": "responses per PPO update"})
    epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    actor_lr: float = field(default=1e-3, metadata={"help": "learning rate of the actor's LoRA"})
    critic_lr: float = field(default=1e-3, metadata={"help": "learning rate of the critic's LoRA and value head"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of actor and critic"})
    beta: float = field(default=0.2, metadata={"help": "KL penalty coefficient (initial value when adaptive)"})
    kl_target: float | None = field(default=None, metadata={"help": "target KL per response for an adaptive beta; none keeps beta fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller, in responses"})
    gamma: float = field(default=1.0, metadata={"help": "discount of GAE"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE"})
    eps_clip: float = field(default=0.2, metadata={"help": "clip range of the policy ratio"})
    value_clip: float = field(default=0.2, metadata={"help": "clip range of the value change"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted from the score of a response without EOS (none disables)"})
    rollout_memmap_dir: str | None = field(default=None, metadata={"help": "keep rollouts in memory-mapped files in this folder"})
    best_of: str = field(default="1,4", metadata={"help": "N of the best-of-N comparison at the end (evaluate.py draws the whole curve)"})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, fp16 or bf16; by default what accelerate launch was given (--mixed_precision, its config), else no"})
    checkpoint_every: int = field(default=10, metadata={"help": "iterations between resumable checkpoints"})
    out_dir: str = field(default="runs/ppo", metadata={"help": "run folder: checkpoint/, final/, metrics.csv, ppo.png"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and prompt order"})


def train(cfg: TrainPPOConfig) -> dict:
    accelerator = make_accelerator(cfg.minibatch_size, cfg.max_grad_norm, mixed_precision=cfg.mixed_precision,
                                   log_with=available_trackers(), project_dir=cfg.out_dir)
    set_seed(cfg.seed)
    palm, reward_model = load_models(cfg)
    tokenizer = palm.tokenizer  # saved with the LM: bytes, or the BPE it was trained with
    train_prompts, eval_prompts = split_prompts(cfg, tokenizer, palm.pad_id)
    trainer = RLHFTrainer(
        palm=palm, reward_model=reward_model, prompts=train_prompts, tokenizer=tokenizer,
        actor_lora_r=cfg.lora_r, critic_lora_r=cfg.lora_r, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
        beta=cfg.beta, kl_target=cfg.kl_target, kl_horizon=cfg.kl_horizon, gamma=cfg.gamma, lam=cfg.lam,
        eps_clip=cfg.eps_clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef, entropy_coef=cfg.entropy_coef,
        max_norm=cfg.max_grad_norm or None, seed=cfg.seed, epochs=cfg.epochs, minibatch_size=cfg.minibatch_size,
        missing_eos_penalty=cfg.missing_eos_penalty, rollout_memmap_dir=cfg.rollout_memmap_dir, accelerator=accelerator,
    )
    return run_rl_stage(
        cfg, trainer, accelerator=accelerator, model=trainer.actor_critic, stage="ppo", method="PPO",
        eval_prompts=eval_prompts, step=lambda: trainer.step(cfg.max_seq_len, cfg.rollout_batch_size, cfg.temperature),
        plot_panels=[["score", "eval_score"], ["kl"], ["vader", "eval_vader"], ["response_length"],
                     ["approx_kl", "clip_fraction", "explained_variance"]],
        extra_state=lambda: dict(beta=trainer.kl.beta),  # an adaptive beta resumes where it was
        restore_state=lambda extra: setattr(trainer.kl, "beta", extra["beta"]),
    )


if __name__ == "__main__":
    train(parse_config(TrainPPOConfig, sys.argv[1:]))
