"""Stage 3: tune the language model with PPO against the reward model (palm_rlhf/ppo.py).

    python train_ppo.py                   # runs/lm/final + runs/reward/final -> runs/ppo/final, ~4 min
    python train_ppo.py --resume          # continue a killed run where it stopped

Prompts are the first --prompt_words words of the held-out `prompts` split of the rated movie-review
snippets (palm_rlhf/data.py), which neither the LM nor the reward model was trained on; the last
--num_eval_prompts of them are kept out of PPO too and used for the before/after table. Besides the
reward model's score, every iteration logs the VADER sentiment of the sampled responses: a scorer no
model here was trained on, so it tells whether RL improved the real thing or only the learned reward.
Leaves runs/ppo/final (the policy with its adapters merged; PaLM.from_pretrained), metrics.csv,
samples.jsonl (every iteration's prompts and responses) and ppo.png.
"""
import sys
from dataclasses import dataclass

from palm_rlhf.config import parse_config, setting
from palm_rlhf.ppo import PPOConfig, RLHFTrainer
from palm_rlhf.rl_stage import (
    RLStageConfig, best_of_sizes, finish, held_out_before, load_models, log_iteration, split_prompts,
)
from palm_rlhf.training import Run, SampleLogger, script_accelerator

PLOT = [["score", "eval_score"], ["kl"], ["beta"], ["vader", "eval_vader"], ["response_length"],
        ["approx_kl", "clip_fraction", "explained_variance"]]


@dataclass
class TrainPPOConfig(RLStageConfig, PPOConfig):
    """Tune a PaLM with PPO against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    out_dir: str = setting("runs/ppo", "run folder: checkpoint/, final/, metrics.csv, samples.jsonl, ppo.png")


def train(cfg: TrainPPOConfig) -> dict:
    best_of = best_of_sizes(cfg.best_of)
    accelerator = script_accelerator(cfg, cfg.minibatch_size)
    palm, reward_model = load_models(cfg)
    train_prompts, eval_prompts = split_prompts(cfg, palm.tokenizer)
    try:
        trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompts=train_prompts, config=cfg, accelerator=accelerator)
    except ValueError as error:  # a window without room for a response
        raise SystemExit(f"train_ppo.py: {error}") from None

    state = {}  # what a checkpoint keeps beside the weights: the LM's scores, an adaptive beta
    run = Run(cfg, accelerator, name="ppo", total=cfg.iterations, model=trainer.actor_critic, optimizer=trainer.optimizer,
              extra_state=lambda: dict(state, beta=trainer.kl.beta), plot=PLOT, unit="iteration")
    state["before"] = held_out_before(run, trainer, eval_prompts, cfg, best_of)
    if run.resumed:  # iteration `start` draws its prompts and samples as it would have; an adaptive beta resumes
        trainer.iteration, trainer.kl.beta = run.start, run.resumed["beta"]
    samples = SampleLogger(cfg.out_dir, accelerator, resume=cfg.resume)

    stats = {}  # the last iteration's, for the report
    for iteration in run:
        stats, rollout = trainer.step()
        log_iteration(run, samples, trainer, iteration, stats, rollout)

    return finish(run, trainer, eval_prompts, cfg, state["before"], best_of, "PPO", stats)

if __name__ == "__main__":
    train(parse_config(TrainPPOConfig, sys.argv[1:]))
