"""What the RL-stage scripts (train_ppo.py, train_grpo.py) share besides their trainers: the LM and
reward model from their checkpoints, the held-out prompts, best-of-N evaluation by the reward model
and by VADER (a scorer no model here was trained on, so it tells whether RL improved the real thing
or only the learned reward), the before/after table. Each script writes its own loop.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from palm_rlhf.config import setting
from palm_rlhf.data import load_rated_snippets, review_prompts, split_snippets, vader_compound
from palm_rlhf.reward import RewardEnsemble, RewardModel, encode_reward_input, pad_right, split_prompt
from palm_rlhf.rl import decode_responses, prompt_list
from palm_rlhf.training import RunConfig, load_lm


@dataclass
class RLStageConfig(RunConfig):
    """What train_ppo.py and train_grpo.py add to their trainer's config: the models, the held-out
    prompts, the run folder."""

    lm_checkpoint: str = setting("runs/lm/final", "train_lm.py's final folder (the policy and the frozen reference)")
    reward_checkpoint: str = setting("runs/reward/final", "train_reward.py's final folder, attached to the policy's base; several, comma-separated: an ensemble")
    ensemble: str = setting("uwo", "how an ensemble's standardised scores combine: mean, min (worst case) or uwo (mean - uncertainty_weight * variance)",
                            choices=RewardEnsemble.COMBINES)
    uncertainty_weight: float = setting(1.0, "lambda of --ensemble uwo", at_least=0)
    prompt_words: int = setting(4, "words of each held-out review snippet used as a prompt", at_least=1)
    num_eval_prompts: int = setting(256, "the last prompts, kept out of training for the before/after table (evaluate.py measures on the same 256)", at_least=1)
    best_of: str = setting("1,4", "N of the best-of-N comparison at the end (evaluate.py draws the whole curve)")
    checkpoint_every: int = setting(10, "iterations between resumable checkpoints", at_least=1)


def mean_vader(texts) -> float:
    """Mean VADER compound sentiment (-1..1) of `texts`."""
    return sum(vader_compound(texts)) / max(1, len(texts))


def load_models(cfg):
    """The LM (policy and frozen reference) from cfg.lm_checkpoint, and the reward model from
    cfg.reward_checkpoint attached to its base (several, comma-separated: an ensemble); a missing
    folder names the script that makes it."""
    reward_paths = [path.strip() for path in cfg.reward_checkpoint.split(",") if path.strip()]
    palm = load_lm(cfg.lm_checkpoint)  # first: a missing LM names the first stage that has not run
    for path in reward_paths:
        if not Path(path).is_dir():
            raise SystemExit(f"--reward_checkpoint {path}: no such folder; run train_reward.py first")
    # the reward model's scope and head go onto the policy's base: one frozen base for all roles
    if len(reward_paths) == 1:
        return palm, RewardModel.from_pretrained(reward_paths[0], palm=palm)
    members = [RewardModel.from_pretrained(path, palm=palm, scope=f"reward_{i}") for i, path in enumerate(reward_paths)]
    ensemble = RewardEnsemble(members, combine=cfg.ensemble, uncertainty_weight=cfg.uncertainty_weight)
    return palm, ensemble.calibrate(*human_texts(palm.tokenizer, cfg.prompt_words))


def human_texts(tokenizer, prompt_words: int, count: int = 512):
    """`count` of the human-written snippets the reward models were trained on, split into prompt and
    response as they were: seq, prompt_mask, mask (right-padded), to calibrate an ensemble on."""
    snippets = split_snippets(load_rated_snippets())["train"]
    snippets = snippets[:: max(1, len(snippets) // count)][:count]
    encoded = [encode_reward_input(*split_prompt(s.text, prompt_words), tokenizer=tokenizer) for s in snippets]
    return pad_right(*zip(*encoded), pad_id=tokenizer.pad_id)


def split_prompts(cfg, tokenizer):
    """The first cfg.prompt_words words of the held-out review snippets: (training prompts as text,
    the last cfg.num_eval_prompts as token ids for the before/after table)."""
    texts = review_prompts(cfg.prompt_words)
    if len(texts) <= cfg.num_eval_prompts:
        raise SystemExit(f"--num_eval_prompts {cfg.num_eval_prompts}: only {len(texts)} prompts; keep some to train on")
    return texts[: -cfg.num_eval_prompts], prompt_list(None, texts[-cfg.num_eval_prompts:], tokenizer, tokenizer.pad_id)


def best_of_sizes(best_of: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]; 1 is always in."""
    try:
        sizes = {1, *(int(n) for n in best_of.split(",") if n.strip())}
    except ValueError:
        raise SystemExit(f"--best_of {best_of!r}: give whole numbers joined by commas, e.g. 1,4") from None
    if min(sizes) < 1:
        raise SystemExit(f"--best_of {best_of!r}: every N must be >= 1")
    return sorted(sizes)


@torch.no_grad()
def evaluate(trainer, prompts, cfg, num_samples=1, chunk=64) -> dict:
    """Best-of-`num_samples` responses of the current actor to each prompt, sampled at a fixed seed
    (each prompt encoded once for its samples): their mean reward-model score and mean VADER
    sentiment, and one example."""
    generator = torch.Generator(trainer.device).manual_seed(cfg.seed)
    per_batch = max(1, chunk // num_samples)  # about `chunk` sequences per batch
    scores, texts = [], []
    for i in range(0, len(prompts), per_batch):
        seq, mask, start = trainer.sample(prompts[i : i + per_batch], trainer.response_budget(cfg.max_seq_len), cfg.temperature,
                                          group_size=num_samples, generator=generator)
        scores.append(trainer.score(seq, mask, start).cpu())
        response_tokens = mask.clone()
        response_tokens[:, :start] = False
        texts += decode_responses(seq, response_tokens, trainer.tokenizer)
    scores = torch.cat(scores).view(len(prompts), num_samples)  # (prompts, N)
    best = scores.argmax(dim=1)
    best_texts = [texts[i * num_samples + int(j)] for i, j in enumerate(best)]
    return dict(score=scores.max(dim=1).values.mean().item(), vader=mean_vader(best_texts),
                example=trainer.tokenizer.decode(prompts[0][1:]) + best_texts[0])


def comparison_table(before, after, best_of, method: str) -> str:
    lines = [f"{'policy':<26} {'RM score':>9} {'VADER':>7}"]
    lines += [f"{f'before {method} (the LM)':<26} {before[1]['score']:>9.3f} {before[1]['vader']:>7.3f}",
              f"{f'after {method}':<26} {after['score']:>9.3f} {after['vader']:>7.3f}"]
    for n in best_of:
        lines.append(f"{f'best-of-{n}, before {method}':<26} {before[n]['score']:>9.3f} {before[n]['vader']:>7.3f}")
    return "\n".join(lines)


def report(before: dict, after: dict, best_of: list, method: str, stats: dict, eval_prompts, seed: int) -> str:
    """The end-of-run report: the before/after table on the held-out prompts and an example."""
    kl = f"{stats['kl']:.3f} nats per response" if "kl" in stats else "not measured"
    return (f"\non {len(eval_prompts)} held-out prompts, sampled at seed {seed} (KL to the LM at the end: {kl})\n"
            + comparison_table(before, after, best_of, method)
            + f"\nbefore: {before[1]['example']!r}\nafter:  {after['example']!r}")


def held_out_before(run, trainer, eval_prompts, cfg, best_of: list) -> dict:
    """The LM's best-of-N scores on the held-out prompts (the actor starts equal to it), or, resumed,
    those the checkpoint kept; logged at step 0 as eval_score and eval_vader."""
    if run.resumed:
        return {int(n): v for n, v in run.resumed["before"].items()}
    before = {n: evaluate(trainer, eval_prompts, cfg, n) for n in best_of}
    run.log(0, eval_score=before[1]["score"], eval_vader=before[1]["vader"])
    return before


def log_iteration(run, samples, trainer, iteration: int, stats: dict, rollout) -> None:
    """An iteration's diagnostics and its responses' VADER to metrics.csv, its prompts and responses to
    samples.jsonl; a non-finite loss stops the run. Each process's responses are its own: their VADER
    is averaged over processes (equal counts)."""
    run.check_loss(sum(v for k, v in stats.items() if k.endswith("loss")), iteration)
    responses = rollout.responses(trainer.tokenizer)
    vader = trainer.accelerator.reduce(torch.tensor(mean_vader(responses), device=trainer.device), "mean")
    run.log(iteration + 1, **stats, vader=vader)
    samples.log(iteration + 1, rollout.prompt_texts(trainer.tokenizer), responses)
    run.postfix(**{k: stats[k] for k in ("score", "kl", "response_length") if k in stats})


def finish(run, trainer, eval_prompts, cfg, before: dict, best_of: list, method: str, stats: dict) -> dict:
    """The end of an RL script's run: the tuned actor on the held-out prompts, the run's end (the
    final merged policy), and the report -> dict(before, after)."""
    after = evaluate(trainer, eval_prompts, cfg)
    run.log(cfg.iterations, eval_score=after["score"], eval_vader=after["vader"])
    final = run.finish(trainer.save_policy)
    if trainer.accelerator.is_main_process:
        print(report(before, after, best_of, method, stats, eval_prompts, cfg.seed))
        print(f"tuned policy in {final}; metrics in {run.out_dir / 'metrics.csv'}, plot {run.out_dir / run.plot_file}")
    return dict(before=before, after=after)
