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

import torch

from palm_rlhf.config import parse_config, setting
from palm_rlhf.grpo import GRPOConfig, GRPOTrainer
from palm_rlhf.rl_stage import RLStageConfig, best_of_sizes, evaluate, load_models, mean_vader, report, split_prompts
from palm_rlhf.training import Run, SampleLogger, available_trackers, make_accelerator, set_seed

PLOT = [["score", "eval_score"], ["kl"], ["vader", "eval_vader"], ["response_length"],
        ["approx_kl", "clip_fraction", "zero_variance_groups"]]


@dataclass
class TrainGRPOConfig(RLStageConfig, GRPOConfig):
    """Tune a PaLM with group-relative, critic-free RL against a reward model; checkpoints resume; metrics go to CSV and a plot."""

    out_dir: str = setting("runs/grpo", "run folder: checkpoint/, final/, metrics.csv, samples.jsonl, grpo.png")


def train(cfg: TrainGRPOConfig) -> dict:
    best_of = best_of_sizes(cfg.best_of)
    accelerator = make_accelerator(cfg.minibatch_size, cfg.max_grad_norm, mixed_precision=cfg.mixed_precision,
                                   log_with=available_trackers(), project_dir=cfg.out_dir)
    set_seed(cfg.seed)
    palm, reward_model = load_models(cfg)
    train_prompts, eval_prompts = split_prompts(cfg, palm.tokenizer)
    try:
        trainer = GRPOTrainer(palm=palm, reward_model=reward_model, prompts=train_prompts, config=cfg, accelerator=accelerator)
    except ValueError as error:  # a window without room for a response
        raise SystemExit(f"train_grpo.py: {error}") from None

    state = {}  # what a checkpoint keeps beside the weights: the LM's scores
    run = Run(cfg, accelerator, name="grpo", total=cfg.iterations, model=trainer.actor, optimizer=trainer.optimizer,
              extra_state=lambda: dict(state), plot=PLOT, unit="iteration")
    if run.resumed:  # iteration `start` draws its prompts and samples as it would have
        trainer.iteration = run.start
        state["before"] = {int(n): v for n, v in run.resumed["before"].items()}
    else:  # the actor starts equal to the LM: its samples are the "before" column
        state["before"] = {n: evaluate(trainer, eval_prompts, cfg, n) for n in best_of}
        run.log(0, eval_score=state["before"][1]["score"], eval_vader=state["before"][1]["vader"])
    samples = SampleLogger(cfg.out_dir, accelerator, resume=cfg.resume)

    stats = {}
    for iteration in run:
        stats, rollout = trainer.step()
        run.check_loss(sum(v for k, v in stats.items() if k.endswith("loss")), iteration)
        # each process's responses are its own: their VADER is averaged over processes (equal counts)
        responses = rollout.responses(trainer.tokenizer)
        vader = accelerator.reduce(torch.tensor(mean_vader(responses), device=accelerator.device), "mean")
        run.log(iteration + 1, **stats, vader=vader)
        samples.log(iteration + 1, rollout.prompt_texts(trainer.tokenizer), responses)
        run.postfix(**{k: stats[k] for k in ("score", "kl", "response_length") if k in stats})

    after = evaluate(trainer, eval_prompts, cfg)
    run.log(cfg.iterations, eval_score=after["score"], eval_vader=after["vader"])
    run.finish(trainer.save_policy)
    if accelerator.is_main_process:
        print(report(state["before"], after, best_of, cfg.estimator.upper(), stats, eval_prompts, cfg.seed))
        print(f"tuned policy in {run.out_dir / 'final'}; metrics in {run.out_dir / 'metrics.csv'}, plot {run.out_dir / 'grpo.png'}")
    return dict(before=state["before"], after=after)


if __name__ == "__main__":
    train(parse_config(TrainGRPOConfig, sys.argv[1:]))
