"""What the RL-stage scripts (train_ppo.py, train_grpo.py) share: the LM and reward model from their
checkpoints, the held-out prompts, best-of-N evaluation by the reward model and by VADER (a scorer
no model here was trained on, so it tells whether RL improved the real thing or only the learned
reward), the before/after table, and the loop that runs a trainer's iterations with metrics,
resumable checkpoints, the final merged policy and the plot. Each script adds its config and trainer.
"""
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palm_rlhf.data import load_rated_snippets, review_prompts, split_snippets, vader_compound
from palm_rlhf.palm import PaLM
from palm_rlhf.ppo import decode_responses, prompt_list
from palm_rlhf.reward import RewardEnsemble, RewardModel, encode_reward_input, pad_right, split_prompt
from palm_rlhf.training import (
    GracefulStop,
    MetricsLogger,
    SampleLogger,
    check_finite,
    check_in_sync,
    checkpoint_exists,
    init_trackers,
    load_checkpoint,
    plot_metrics,
    save_checkpoint,
    write_run_record,
)


@dataclass
class RLStageConfig:
    """The options train_ppo.py and train_grpo.py share: the models, the prompts and the sampling."""

    lm_checkpoint: str = field(default="runs/lm/final", metadata={"help": "train_lm.py's final folder (the policy and the frozen reference)"})
    reward_checkpoint: str = field(default="runs/reward/final", metadata={"help": "train_reward.py's final folder, attached to the policy's base; several, comma-separated: an ensemble"})
    ensemble: str = field(default="uwo", metadata={"help": "how an ensemble's standardised scores combine: mean, min (worst case) or uwo (mean - uncertainty_weight * variance)"})
    uncertainty_weight: float = field(default=1.0, metadata={"help": "lambda of --ensemble uwo"})
    prompt_words: int = field(default=4, metadata={"help": "words of each held-out review snippet used as a prompt"})
    num_eval_prompts: int = field(default=256, metadata={"help": "the last prompts, kept out of training for the before/after table (evaluate.py measures on the same 256)"})
    max_seq_len: int = field(default=48, metadata={"help": "the longest prompt + the response budget, in tokens: each response gets at most max_seq_len - the longest training prompt (48 - 17 = 31 BPE tokens hold most review snippets; with a byte-level LM use about 160)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts (and of the policy's log-probs)"})


def mean_vader(texts) -> float:
    """Mean VADER compound sentiment (-1..1) of `texts`."""
    return sum(vader_compound(texts)) / max(1, len(texts))


def load_models(cfg):
    """The LM (policy and frozen reference) from cfg.lm_checkpoint, and the reward model from
    cfg.reward_checkpoint attached to its base (several, comma-separated: an ensemble); a missing
    folder names the script that makes it."""
    reward_paths = [path.strip() for path in cfg.reward_checkpoint.split(",") if path.strip()]
    for flag, path, script in (("lm_checkpoint", cfg.lm_checkpoint, "train_lm.py"),
                               *(("reward_checkpoint", path, "train_reward.py") for path in reward_paths)):
        if not Path(path).is_dir():
            raise SystemExit(f"--{flag} {path}: no such folder; run {script} first")
    palm = PaLM.from_pretrained(cfg.lm_checkpoint)
    if palm.tokenizer is None:
        raise SystemExit(f"--lm_checkpoint {cfg.lm_checkpoint}: its {palm.num_tokens}-token vocabulary came without a tokenizer.json")
    # the reward model's scope and head go onto the policy's base: one frozen base for all roles
    if len(reward_paths) == 1:
        return palm, RewardModel.from_pretrained(reward_paths[0], palm=palm)
    if cfg.ensemble not in RewardEnsemble.COMBINES:
        raise SystemExit(f"--ensemble {cfg.ensemble}: choose one of {', '.join(RewardEnsemble.COMBINES)}")
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


def split_prompts(cfg, tokenizer, pad_id: int):
    """The first cfg.prompt_words words of the held-out review snippets: (training prompts as text,
    the last cfg.num_eval_prompts as token ids for the before/after table)."""
    texts = review_prompts(cfg.prompt_words)
    if len(texts) <= cfg.num_eval_prompts:
        raise SystemExit(f"only {len(texts)} prompts; lower --num_eval_prompts ({cfg.num_eval_prompts})")
    return texts[: -cfg.num_eval_prompts], prompt_list(None, texts[-cfg.num_eval_prompts:], tokenizer, pad_id)


def best_of_sizes(best_of: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]; 1 is always in."""
    return sorted({1, *(int(n) for n in best_of.split(",") if n.strip())})


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


def run_rl_stage(cfg, trainer, *, accelerator, model, stage: str, method: str, eval_prompts, step, plot_panels,
                 extra_state=dict, restore_state=None) -> dict:
    """The loop of an RL script, for `cfg.iterations` calls of `step() -> (stats, rollout)`:

    resume from out_dir/checkpoint (`model` and trainer.optimizer; `restore_state(extra)` gets back
    what `extra_state()` saved, and trainer.iteration is set to the iteration resumed at); evaluate the LM (best-of-N on `eval_prompts`); log every
    iteration's stats and its rollouts' VADER to metrics.csv; save a checkpoint every
    cfg.checkpoint_every iterations and on Ctrl-C; then evaluate the tuned policy, save it merged to
    out_dir/final, plot `plot_panels` to out_dir/<stage>.png, print the before/after table, and end
    the run (trackers closed, the process group destroyed).
    Returns dict(before, after), or {} when stopped early."""
    out_dir, checkpoint_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoint"
    best_of = best_of_sizes(cfg.best_of)
    start, before = 0, None
    if cfg.resume:
        if not checkpoint_exists(checkpoint_dir):
            raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir}; start without --resume")
        state = load_checkpoint(checkpoint_dir, model=model, optimizer=trainer.optimizer, accelerator=accelerator)
        start, before = state["step"], {int(n): v for n, v in state["extra"]["before"].items()}
        trainer.iteration = start  # iteration `start` draws its prompts and samples as it would have
        if restore_state is not None:
            restore_state(state["extra"])
        accelerator.print(f"resumed at iteration {start}")
    init_trackers(accelerator, f"palm_rlhf_{stage}", asdict(cfg))
    metrics = MetricsLogger(out_dir, accelerator, resume=cfg.resume)
    samples = SampleLogger(out_dir, accelerator, resume=cfg.resume)
    if before is None:  # the actor starts equal to the LM: its samples are the "before" column
        before = {n: evaluate(trainer, eval_prompts, cfg, n) for n in best_of}
        metrics.log(0, eval_score=before[1]["score"], eval_vader=before[1]["vader"])
        accelerator.print(f"before {method}: RM score {before[1]['score']:.3f}, VADER {before[1]['vader']:.3f}; "
                          f"e.g. {before[1]['example']!r}")

    def save(iteration):
        save_checkpoint(checkpoint_dir, accelerator=accelerator, model=model, optimizer=trainer.optimizer,
                        step=iteration, extra=dict(extra_state(), before=before), config=asdict(cfg))

    stop, stats = GracefulStop(), {}
    progress = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"train_{stage}",
                    disable=not accelerator.is_main_process)
    for iteration in progress:
        stats, rollout = step()
        check_finite(sum(v for k, v in stats.items() if k.endswith("loss")), iteration,
                     hint=f"stopped; the last good checkpoint in {checkpoint_dir} is intact")
        # each process's responses are its own: their VADER is averaged over processes (equal counts)
        responses = rollout.responses(trainer.tokenizer)
        vader = accelerator.reduce(torch.tensor(mean_vader(responses), device=accelerator.device), "mean")
        metrics.log(iteration + 1, **stats, vader=vader)
        samples.log(iteration + 1, rollout.prompt_texts(trainer.tokenizer), responses)
        progress.set_postfix({k: f"{stats[k]:.3f}" for k in ("score", "kl", "response_length") if k in stats})
        done = iteration + 1
        if stop.requested_on_any(accelerator):
            save(done)
            accelerator.print(f"\nstopped at iteration {done}; checkpoint in {checkpoint_dir}; continue with --resume")
            return {}
        if done % cfg.checkpoint_every == 0 and done < cfg.iterations:
            save(done)

    check_in_sync(accelerator, model)
    save(cfg.iterations)
    after = evaluate(trainer, eval_prompts, cfg)
    metrics.log(cfg.iterations, eval_score=after["score"], eval_vader=after["vader"])
    trainer.save_policy(out_dir / "final")
    if accelerator.is_main_process:
        write_run_record(out_dir / "final", cfg)
        plot_metrics(out_dir / "metrics.csv", out_dir / f"{stage}.png", plot_panels)
        kl = f"{stats['kl']:.3f} nats per response" if "kl" in stats else "not measured"
        print(f"\non {len(eval_prompts)} held-out prompts, sampled at seed {cfg.seed} (KL to the LM at the end: {kl})")
        print(comparison_table(before, after, best_of, method))
        print(f"before: {before[1]['example']!r}\nafter:  {after['example']!r}")
        print(f"tuned policy in {out_dir / 'final'}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / stage}.png")
    accelerator.wait_for_everyone()  # all leave together, once the main process has written
    accelerator.end_training()
    return dict(before=before, after=after)
