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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from palm_rlhf.checkpoint import whole_copy
from palm_rlhf.config import SettingError, parse_config, setting
from palm_rlhf.model import PRESETS
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
from palm_rlhf.dpo import DPOConfig, DPOTrainer, kto_examples, pack_sequences, reference_kl
from palm_rlhf.training import Run, RunConfig, load_lm, script_accelerator


@dataclass
class TrainDPOConfig(RunConfig, DPOConfig):
    """Tune PaLM's LoRA adapters on human preferences by DPO, IPO, cDPO or KTO; the adapters-off model is the reference."""

    lm_checkpoint: str = setting("runs/lm/final", "PaLM to start from (train_lm.py's final), or 'none' for a fresh --preset model")
    preset: str = setting("tiny", "model size when --lm_checkpoint none (tests)", choices=tuple(PRESETS))
    train_file: str | None = setting(None, "JSONL of {prompt, chosen, rejected} (or, for kto, {prompt, response, rating}); default: the rated movie snippets")
    eval_file: str | None = setting(None, "JSONL of held-out {prompt, chosen, rejected}; default: pairs of the held-out test snippets")
    margin: float = setting(1.0, "snippet pairs: least difference of the human mean ratings (-4..4)", above=0)
    max_pairs: int | None = setting(None, "use at most this many training pairs", at_least=1)
    max_eval_pairs: int | None = setting(None, "use at most this many held-out pairs", at_least=1)
    kto_desirable_min: float = setting(4, "kto: a rating >= this is desirable (stars 1-5 for the snippets)")
    kto_undesirable_max: float = setting(2, "kto: a rating <= this is undesirable")
    eval_every: int = setting(100, "steps between held-out preference evaluations", at_least=1)
    checkpoint_every: int = setting(50, "steps between resumable checkpoints", at_least=1)
    num_eval_prompts: int = setting(256, "held-out review prompts (the last N, as the RL scripts') sampled before and after training", at_least=1)
    gen_len: int = setting(31, "tokens sampled per prompt: the RL scripts' response budget (48 - the longest training prompt, 17 BPE tokens); about 100 for a byte-level LM", at_least=1)
    temperature: float = setting(1.0, "sampling temperature of the before/after generations", above=0)
    out_dir: str = setting("runs/dpo", "run folder: checkpoint/, final/, metrics.csv, plot, summary.json")

    def __post_init__(self):
        super().__post_init__()
        if self.kto_desirable_min <= self.kto_undesirable_max:
            raise SettingError("kto_desirable_min", self.kto_desirable_min, f"must exceed --kto_undesirable_max ({self.kto_undesirable_max})")


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


# before / after: sentiment of generations and KL to the reference


@torch.no_grad()
def sample_generations(palm, prompts: list, cfg, batch_size: int = 64, **scope):
    """Samples a response to each prompt at one fixed seed: (prompt token lists, response token lists)."""
    tokenizer = palm.tokenizer
    generator = torch.Generator(device=palm.device).manual_seed(cfg.seed)
    heads = [tokenizer.encode_prompt(p).tolist() for p in prompts]
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
    out_dir = Path(cfg.out_dir)
    accelerator = script_accelerator(cfg, cfg.batch_size)
    palm = load_lm(cfg.lm_checkpoint, preset=cfg.preset, needs_tokenizer=False).to(accelerator.device)
    data, eval_pairs = load_training_data(cfg), load_eval_pairs(cfg)
    what = "examples" if cfg.method == "kto" else "pairs"
    accelerator.print(f"{cfg.method}: {len(data)} training {what}, {len(eval_pairs)} held-out pairs")
    trainer = DPOTrainer(palm=palm, config=cfg, accelerator=accelerator, **{"examples" if cfg.method == "kto" else "pairs": data})
    reward_keys = ["chosen_reward", "rejected_reward"] if cfg.method != "kto" else ["desirable_reward", "undesirable_reward"]
    run = Run(cfg, accelerator, name="dpo", total=cfg.steps, model=trainer.model, optimizer=trainer.optimizer,
              scheduler=trainer.scheduler, extra_state=lambda: dict(train_config=asdict(cfg)), checkpoint_config=asdict(palm.config),
              plot=[["loss"], ["pref_accuracy", "eval_pref_accuracy"], reward_keys + ["eval_reward_margin"], ["lr"]],
              plot_file=f"{cfg.method}.png")
    trainer.step = run.start

    before = trainer.evaluate(eval_pairs)  # policy == reference at step 0: all ties, accuracy 0.5
    if trainer.step == 0:
        run.log(0, **{f"eval_{k}": v for k, v in before.items()})
    for step in run:
        metrics = trainer.train_step()
        run.log(step + 1, **metrics)
        run.postfix(loss=metrics["loss"])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held_out = trainer.evaluate(eval_pairs)
            run.log(step + 1, **{f"eval_{k}": v for k, v in held_out.items()})
            run.write(f"step {step + 1}: held-out preference accuracy {held_out['pref_accuracy']:.3f}, "
                      f"reward margin {held_out['reward_margin']:.3f}")

    after = trainer.evaluate(eval_pairs)
    summary = {}

    def save_final(directory):
        tuned = whole_copy(accelerator, trainer.model, palm)
        if accelerator.is_main_process:
            report = generation_report(tuned, cfg.scope, cfg)
            summary.update(method=cfg.method, beta=cfg.beta, steps=cfg.steps, pref_accuracy_before=before["pref_accuracy"],
                           **after, **report)
            run.log(cfg.steps, vader_before=report["vader_before"], vader_after=report["vader_after"],
                    kl_per_token=report["kl_per_token"], kl_per_response=report["kl_per_response"])
            tuned.merge_finetune_params(cfg.scope)  # the final model needs no adapters
            tuned.save(directory)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print_summary(cfg, before, after, report)

    final = run.finish(save_final)
    accelerator.print(f"final model in {final}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / f'{cfg.method}.png'}")
    return summary


if __name__ == "__main__":
    train(parse_config(TrainDPOConfig))
