"""Stage 3 without a critic: tune the language model with GRPO, Dr. GRPO or RLOO against the reward
model (palm_rlhf/grpo.py).

    python train_grpo.py                        # RLOO: runs/lm/final + runs/reward/final -> runs/grpo/final, ~3 min
    python train_grpo.py --estimator grpo --kl_in loss --beta 0.04 --out_dir runs/grpo_k3   # as DeepSeekMath
    python train_grpo.py --resume               # continue a killed run where it stopped

Each iteration samples --group_size responses to each of --prompts_per_step prompts; a response's
advantage is its score against the others of its group. The prompts, the held-out evaluation, the
VADER logging and the before/after table are train_ppo.py's (palm_rlhf/rl_stage.py).
Leaves runs/grpo/final (the policy with its adapters merged; PaLM.from_pretrained), metrics.csv,
samples.jsonl and grpo.png.
"""
import sys
from dataclasses import dataclass

from palm_rlhf.config import parse_config, setting
from palm_rlhf.grpo import GRPOConfig, GRPOTrainer
from palm_rlhf.rl_stage import (
    RLStageConfig, best_of_sizes, finish, held_out_before, load_models, log_iteration, split_prompts,
)
from palm_rlhf.training import Run, SampleLogger, script_accelerator

PLOT = [["score", "eval_score"], ["kl"], ["beta"], ["vader", "eval_vader"], ["response_length"],
        ["approx_kl", "clip_fraction", "zero_variance_groups"]]


@dataclass
class TrainGRPOConfig(RLStageConfig, GRPOConfig):
    """Tune a PaLM with group-relative, critic-free RL against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    out_dir: str = setting("runs/grpo", "run folder: checkpoint/, final/, metrics.csv, samples.jsonl, grpo.png")


def train(cfg: TrainGRPOConfig) -> dict:
    best_of = best_of_sizes(cfg.best_of)
    accelerator = script_accelerator(cfg, cfg.minibatch_size)
    palm, reward_model = load_models(cfg)
    train_prompts, eval_prompts = split_prompts(cfg, palm.tokenizer)
    try:
        trainer = GRPOTrainer(palm=palm, reward_model=reward_model, prompts=train_prompts, config=cfg, accelerator=accelerator)
    except ValueError as error:  # a window without room for a response
        raise SystemExit(f"train_grpo.py: {error}") from None

    state = {}  # what a checkpoint keeps beside the weights: the LM's scores, an adaptive beta
    run = Run(cfg, accelerator, name="grpo", total=cfg.iterations, model=trainer.actor, optimizer=trainer.optimizer,
              extra_state=lambda: dict(state, beta=trainer.kl.beta), plot=PLOT, unit="iteration")
    state["before"] = held_out_before(run, trainer, eval_prompts, cfg, best_of)
    if run.resumed:  # iteration `start` draws its prompts and samples as it would have; an adaptive beta resumes
        trainer.iteration, trainer.kl.beta = run.start, run.resumed["beta"]
    samples = SampleLogger(cfg.out_dir, accelerator, resume=cfg.resume)

    stats = {}  # the last iteration's, for the report
    for iteration in run:
        stats, rollout = trainer.step()
        log_iteration(run, samples, trainer, iteration, stats, rollout)

    return finish(run, trainer, eval_prompts, cfg, state["before"], best_of, cfg.estimator.upper(), stats)

if __name__ == "__main__":
    train(parse_config(TrainGRPOConfig, sys.argv[1:]))
