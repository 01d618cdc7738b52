"""Direct preference optimisation of the pretrained PaLM on human-rated movie-review snippets:
DPO, IPO, conservative DPO (pairs) or KTO (unpaired desirable / undesirable snippets).

    python train_dpo.py                        # DPO from runs/lm/final, ~15 min on 2 CPU cores
    python train_dpo.py --method kto --out_dir runs/kto
    python train_dpo.py --resume               # continue a killed run where it stopped

Data (palm_rlhf/data.py): pairs of `train` snippets whose human mean ratings differ by >= --margin
(the higher is chosen); for KTO, snippets of >= 4 stars are desirable and <= 2 stars undesirable.
Held-out preference accuracy is measured on pairs of `test` snippets. At the end, responses are
sampled from the held-out review prompts before (the reference: adapters off) and after training at
one seed, and scored by VADER, a sentiment scorer no model here was trained on.

Leaves runs/dpo/final (adapters merged; PaLM.from_pretrained), metrics.csv, dpo.png, summary.json.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.data import (
    PAIR_KEYS,
    RATING_KEYS,
    load_rated_snippets,
    make_preference_pairs,
    make_rating_records,
    read_jsonl,
    read_pairs,
    read_ratings,
    review_prompts,
    split_snippets,
    vader_compound,
)
from palm_rlhf.dpo import METHODS, DPOTrainer, kto_examples, pack_sequences, reference_kl
from palm_rlhf.training import (
    MetricsLogger,
    available_trackers,
    check_in_sync,
    checkpoint_exists,
    init_trackers,
    load_checkpoint,
    make_accelerator,
    parse_config,
    plot_metrics,
    save_checkpoint,
    set_seed,
    write_run_record,
    whole_copy,
)


@dataclass
class TrainDPOConfig:
    """Tune PaLM's LoRA adapters on human preferences by DPO, IPO, cDPO or KTO; the adapters-off model is the reference."""

    lm_checkpoint: str = field(default="runs/lm/final", metadata={"help": "PaLM to start from (train_lm.py's final), or 'none' for a fresh --preset model"})
    preset: str = field(default="tiny", metadata={"help": "model size when --lm_checkpoint none (tests)"})
    method: str = field(default="dpo", metadata={"help": "dpo, ipo, cdpo (DPO with label smoothing) or kto"})
    beta: float = field(default=0.1, metadata={"help": "strength of the pull to the reference (IPO's tau)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cdpo: assumed probability that a preference label is flipped"})
    lambda_d: float = field(default=1.0, metadata={"help": "kto: weight of desirable examples"})
    lambda_u: float = field(default=1.0, metadata={"help": "kto: weight of undesirable examples"})
    train_file: str | None = field(default=None, metadata={"help": "JSONL of {prompt, chosen, rejected} (or, for kto, {prompt, response, rating}); default: the rated movie snippets"})
    eval_file: str | None = field(default=None, metadata={"help": "JSONL of held-out {prompt, chosen, rejected}; default: pairs of the held-out test snippets"})
    margin: float = field(default=1.0, metadata={"help": "snippet pairs: least difference of the human mean ratings (-4..4)"})
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "use at most this many held-out pairs"})
    kto_desirable_min: float = field(default=4, metadata={"help": "kto: a rating >= this is desirable (stars 1-5 for the snippets)"})
    kto_undesirable_max: float = field(default=2, metadata={"help": "kto: a rating <= this is undesirable"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the policy adapters"})
    steps: int = field(default=350, metadata={"help": "optimizer steps (350 x 16 is about one pass over the pairs)"})
    batch_size: int = field(default=16, metadata={"help": "pairs (kto: examples) per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the adapters"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    max_len: int = field(default=96, metadata={"help": "longest sequence in tokens (96 BPE tokens hold about 340 bytes; with a byte-level LM use about 320); longer responses are cut"})
    precompute_ref: bool = field(default=False, metadata={"help": "compute the reference log-probs of all training data once, not per batch"})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, fp16 or bf16; by default what accelerate launch was given (--mixed_precision, its config), else no"})
    eval_every: int = field(default=100, metadata={"help": "steps between held-out preference evaluations"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between resumable checkpoints"})
    num_eval_prompts: int = field(default=256, metadata={"help": "held-out review prompts (the last N; 32 = train_ppo.py's) sampled before and after training"})
    gen_len: int = field(default=31, metadata={"help": "tokens sampled per prompt: the RL scripts' response budget (48 - the longest training prompt, 17 BPE tokens); about 100 for a byte-level LM"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the before/after generations"})
    out_dir: str = field(default="runs/dpo", metadata={"help": "run folder: checkpoint/, final/, metrics.csv, plot, summary.json"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for pairing, batches and sampling"})


# data


def load_training_data(cfg) -> list:
    """Pairs for dpo/ipo/cdpo, {prompt, response, desirable} examples for kto."""
    if cfg.train_file is None:
        train = split_snippets(load_rated_snippets())["train"]
        if cfg.method == "kto":
            stars = make_rating_records(train, k=5)
            return kto_examples(stars, cfg.kto_desirable_min, cfg.kto_undesirable_max)[: cfg.max_pairs]
        return make_preference_pairs(train, margin=cfg.margin, max_pairs=cfg.max_pairs, seed=cfg.seed)
    first = (read_jsonl(cfg.train_file) or [{}])[0]
    if all(k in first for k in PAIR_KEYS):
        pairs = read_pairs(cfg.train_file)[: cfg.max_pairs]
        if cfg.method != "kto":
            return pairs
        # unpaired view of pairs: each chosen response desirable, each rejected one undesirable
        return [dict(prompt=p["prompt"], response=p[k], desirable=k == "chosen") for p in pairs for k in ("chosen", "rejected")]
    if all(k in first for k in RATING_KEYS) and cfg.method == "kto":
        return kto_examples(read_ratings(cfg.train_file), cfg.kto_desirable_min, cfg.kto_undesirable_max)[: cfg.max_pairs]
    wanted = "{prompt, chosen, rejected} or {prompt, response, rating}" if cfg.method == "kto" else "{prompt, chosen, rejected}"
    raise SystemExit(f"{cfg.train_file}: --method {cfg.method} needs JSONL records {wanted}; the first has {sorted(first)}")


def load_eval_pairs(cfg) -> list:
    if cfg.eval_file is not None:
        return read_pairs(cfg.eval_file)[: cfg.max_eval_pairs]
    test = split_snippets(load_rated_snippets())["test"]
    return make_preference_pairs(test, margin=cfg.margin, max_pairs=cfg.max_eval_pairs, seed=cfg.seed)


def load_palm(cfg) -> PaLM:
    if cfg.lm_checkpoint.lower() == "none":
        return PaLM.from_config(PaLMConfig.from_name(cfg.preset))
    if not Path(cfg.lm_checkpoint).exists():
        raise SystemExit(f"no language model at {cfg.lm_checkpoint}: run train_lm.py first, or pass --lm_checkpoint")
    return PaLM.from_pretrained(cfg.lm_checkpoint)


# before / after: sentiment of generations and KL to the reference


@torch.no_grad()
def sample_generations(palm, prompts: list, cfg, batch_size: int = 64, **scope):
    """Samples a response to each prompt at one fixed seed: (prompt token lists, response token lists)."""
    tokenizer = palm.tokenizer
    generator = torch.Generator(device=palm.device).manual_seed(cfg.seed)
    heads = [[tokenizer.eos_id] + tokenizer.encode(p).tolist() for p in prompts]
    tails = []
    for start in range(0, len(heads), batch_size):
        batch = [torch.tensor(h) for h in heads[start : start + batch_size]]
        seq_len = max(len(h) for h in batch) + cfg.gen_len
        tokens = palm.generate(seq_len, prompt=batch, temperature=cfg.temperature, eos_token=tokenizer.eos_id,
                               generator=generator, **scope)
        # keep each response up to its first EOS, included (generate pads after it)
        tails += [[t for t in row if t != palm.pad_id] for row in tokens.tolist()]
    return heads, tails


def generation_report(palm, scope: str, cfg) -> dict:
    """VADER sentiment of the responses sampled from the reference (adapters off) and the policy, and
    the policy's exact KL to the reference on its own samples. As in train_ppo.py: the last prompts
    of the held-out split, and VADER scores the response alone, not the prompt."""
    tokenizer = palm.tokenizer
    prompts = review_prompts()[-cfg.num_eval_prompts :]
    report = {}
    for name, scope_args in (("before", dict(disable_lora=True)), ("after", dict(finetune_scope=scope))):
        heads, tails = sample_generations(palm, prompts, cfg, **scope_args)
        responses = [tokenizer.decode(t) for t in tails]
        report[f"vader_{name}"] = sum(vader_compound(responses)) / len(responses)
        report[f"sample_{name}"] = prompts[0] + responses[0]
    per_token, per_response = [], []
    for start in range(0, len(heads), 64):
        seq, mask, response_mask = (t.to(palm.device) for t in pack_sequences(heads[start : start + 64], tails[start : start + 64], palm.pad_id))
        token_kl, response_kl = reference_kl(palm, seq, mask, response_mask, scope, cfg.temperature)
        per_token.append((token_kl, int(response_mask.sum())))
        per_response.append((response_kl, len(seq)))
    report["kl_per_token"] = sum(k * n for k, n in per_token) / sum(n for _, n in per_token)
    report["kl_per_response"] = sum(k * n for k, n in per_response) / sum(n for _, n in per_response)
    return report


def print_summary(cfg, before: dict, after: dict, report: dict):
    rows = [
        ("held-out preference accuracy", f"{before['pref_accuracy']:.3f}", f"{after['pref_accuracy']:.3f}"),
        ("held-out reward margin", f"{before['reward_margin']:.3f}", f"{after['reward_margin']:.3f}"),
        ("VADER compound of responses", f"{report['vader_before']:+.3f}", f"{report['vader_after']:+.3f}"),
        ("KL(policy || ref) per token", "0", f"{report['kl_per_token']:.4f}"),
        ("KL(policy || ref) per response", "0", f"{report['kl_per_response']:.3f}"),
    ]
    print(f"\n{cfg.method.upper()} (beta {cfg.beta}, {cfg.steps} steps)")
    print(f"| {'metric':32} | {'before':>8} | {'after':>8} |\n|{'-' * 34}|{'-' * 10}|{'-' * 10}|")
    for name, b, a in rows:
        print(f"| {name:32} | {b:>8} | {a:>8} |")
    print(f"sample before: {report['sample_before']!r}\nsample after:  {report['sample_after']!r}")


# training


def train(cfg: TrainDPOConfig) -> dict:
    if cfg.method not in METHODS:
        raise SystemExit(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    out_dir = Path(cfg.out_dir)
    accelerator = make_accelerator(cfg.batch_size, cfg.max_grad_norm, gradient_accumulation_steps=cfg.grad_accum,
                                   mixed_precision=cfg.mixed_precision, log_with=available_trackers(),
                                   project_dir=str(out_dir))
    set_seed(cfg.seed)
    palm = load_palm(cfg).to(accelerator.device)
    data, eval_pairs = load_training_data(cfg), load_eval_pairs(cfg)
    what = "examples" if cfg.method == "kto" else "pairs"
    accelerator.print(f"{cfg.method}: {len(data)} training {what}, {len(eval_pairs)} held-out pairs")
    trainer = DPOTrainer(
        palm=palm, method=cfg.method, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        lambda_d=cfg.lambda_d, lambda_u=cfg.lambda_u, lora_r=cfg.lora_r, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm, max_len=cfg.max_len, precompute_ref=cfg.precompute_ref,
        seed=cfg.seed, accelerator=accelerator, **{"examples" if cfg.method == "kto" else "pairs": data},
    )
    checkpoint_dir = out_dir / "checkpoint"
    if cfg.resume:
        if not checkpoint_exists(checkpoint_dir):
            raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir}; start without --resume")
        trainer.step = load_checkpoint(checkpoint_dir, model=trainer.model, optimizer=trainer.optimizer,
                                       scheduler=trainer.scheduler, accelerator=accelerator)["step"]
    init_trackers(accelerator, "palm_rlhf_dpo", asdict(cfg))
    metrics = MetricsLogger(out_dir, accelerator, resume=cfg.resume)

    before = trainer.evaluate(eval_pairs)  # policy == reference at step 0: all ties, accuracy 0.5
    if trainer.step == 0:
        metrics.log(0, **{f"eval_{k}": v for k, v in before.items()})

    def after_step(step, step_metrics):
        metrics.log(step, **step_metrics)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            held_out = trainer.evaluate(eval_pairs)
            metrics.log(step, **{f"eval_{k}": v for k, v in held_out.items()})
            accelerator.print(f"step {step}: held-out preference accuracy {held_out['pref_accuracy']:.3f}, "
                              f"reward margin {held_out['reward_margin']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(checkpoint_dir, accelerator=accelerator, model=trainer.model, optimizer=trainer.optimizer,
                            scheduler=trainer.scheduler, step=step, config=asdict(palm.config),
                            extra=dict(train_config=asdict(cfg)))

    trainer.train(num_steps=cfg.steps, callback=after_step)
    check_in_sync(accelerator, trainer.model)
    after = trainer.evaluate(eval_pairs)
    summary = {}
    tuned = whole_copy(accelerator, trainer.model, palm)
    if accelerator.is_main_process:
        report = generation_report(tuned, trainer.scope, cfg)
        summary = dict(method=cfg.method, beta=cfg.beta, steps=cfg.steps, pref_accuracy_before=before["pref_accuracy"],
                       **{k: v for k, v in after.items()}, **report)
        metrics.log(cfg.steps, vader_before=report["vader_before"], vader_after=report["vader_after"],
                    kl_per_token=report["kl_per_token"], kl_per_response=report["kl_per_response"])
        tuned.merge_finetune_params(trainer.scope)  # the final model needs no adapters
        tuned.save(out_dir / "final")
        write_run_record(out_dir / "final", cfg)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        reward_keys = ["chosen_reward", "rejected_reward"] if cfg.method != "kto" else ["desirable_reward", "undesirable_reward"]
        plot_metrics(out_dir / "metrics.csv", out_dir / f"{cfg.method}.png",
                     [["loss"], ["pref_accuracy", "eval_pref_accuracy"], reward_keys + ["eval_reward_margin"], ["lr"]])
        print_summary(cfg, before, after, report)
        print(f"final model in {out_dir / 'final'}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / f'{cfg.method}.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    train(parse_config(TrainDPOConfig))
