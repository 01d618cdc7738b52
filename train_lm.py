"""Stage 1: pretrain PaLM on real text (WikiText-2 and movie-review snippets by default).

    python train_lm.py                                # the default run (4096-id BPE), ~10 min on 2 CPU cores
    accelerate launch --multi_gpu --num_processes 2 train_lm.py        # N GPUs, same script
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_lm.py  # 2 CPU processes (gloo)
    python train_lm.py --resume                       # continue a killed run where it stopped

    python train_lm.py --tokenizer bytes --steps 800  # bytes (258 ids) instead of the BPE learnt from the corpus

Leaves runs/lm/final (PaLM.from_pretrained, with its tokenizer.json), which train_reward.py,
train_ppo.py and train_dpo.py load. Validation bits per byte are comparable across tokenizers
(the loss per token divided by the bytes of text per token); the EOS between documents counts as a byte.
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.checkpoint import full_state_dict
from palm_rlhf.config import check_settings, parse_config, setting
from palm_rlhf.data import DEFAULT_CORPUS, TokenWindows, bytes_per_token, corpus_token_file, load_corpus
from palm_rlhf.model import PRESETS
from palm_rlhf.tokenizer import TOKENIZER_FILE, load_tokenizer, train_bpe
from palm_rlhf.training import Run, RunConfig, lr_lambda_warmup_cosine, script_accelerator


@dataclass
class TrainLMConfig(RunConfig):
    """Pretrain PaLM on real text shipped offline; checkpoints resume; metrics go to CSV and a plot."""

    corpus: str = setting(DEFAULT_CORPUS, "corpus names joined by '+' (wikitext2, sotu, shakespeare, reviews), a .txt/.jsonl path or a folder of .txt files")
    tokenizer: str = setting("bpe", "bytes, bpe (learnt from the corpus' train split, --vocab_size ids), gpt2, or a tokenizer.json / model folder / folder with vocab.json + merges.txt")
    vocab_size: int = setting(4096, "ids of a --tokenizer bpe, PAD and EOS included", at_least=259)
    preset: str = setting("small", "model size: tiny, small, base, medium, large", choices=tuple(PRESETS))
    seq_len: int = setting(256, "tokens per training window", at_least=2)
    batch_size: int = setting(16, "windows per process per micro-batch", at_least=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", at_least=1)
    steps: int = setting(650, "optimizer steps", at_least=1)
    lr: float = setting(2e-3, "peak learning rate", above=0)
    warmup_steps: int = setting(50, "linear warm-up steps", at_least=0)
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak (cosine decay)", at_least=0, at_most=1)
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices", at_least=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", at_least=0)
    eval_every: int = setting(50, "steps between validation runs", at_least=1)
    eval_batches: int = setting(8, "validation batches per evaluation", at_least=1)
    sample_every: int = setting(200, "steps between generated samples", at_least=1)
    sample_prompt: str = setting("The movie is", "prompt of the logged samples")
    sample_len: int = setting(160, "tokens per logged sample, prompt included", at_least=2)
    checkpoint_every: int = setting(100, "steps between resumable checkpoints", at_least=1)
    out_dir: str = setting("runs/lm", "run folder: checkpoint/, final/, metrics.csv, loss.png")
    seed: int = setting(0, "seed for weights, data windows and sampling")
    cache_dir: str | None = setting(None, "where token files are cached (default ~/.cache/palm_rlhf)")

    def __post_init__(self):
        check_settings(self)


def build_tokenizer(cfg, out_dir: Path, is_main_process: bool):
    """--tokenizer as an object. A BPE is learnt once, by the main process, and kept in out_dir so the
    other processes and a --resume read the same one."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    saved = out_dir / TOKENIZER_FILE
    if not is_main_process or (cfg.resume and saved.exists()):
        return load_tokenizer(saved)
    tokenizer = train_bpe(load_corpus(cfg.corpus)["train"], cfg.vocab_size)
    tokenizer.save(out_dir)
    return tokenizer


def evaluate(palm, windows, cfg, accelerator) -> float:
    """Mean validation loss over fixed windows, the same ones at every evaluation."""
    palm.eval()
    losses = []
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            batch = windows.batch(cfg.batch_size, step=i, seed=cfg.seed + 1, rank=accelerator.process_index)
            losses.append(palm(batch.to(accelerator.device), return_loss=True))
    palm.train()
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def sample_text(palm, cfg, tokenizer) -> str:
    prompt = tokenizer.encode_prompt(cfg.sample_prompt)
    generator = torch.Generator(device=palm.device).manual_seed(cfg.seed)
    tokens = palm.generate(cfg.sample_len, prompt=prompt, temperature=0.8, top_k=40, eos_token=tokenizer.eos_id,
                           generator=generator)
    return cfg.sample_prompt + tokenizer.decode(tokens)


def build_optimizer(palm, cfg):
    # decay matrices only: norms' gains and (tied) embeddings are left alone, as in nanoGPT
    decay = [p for n, p in palm.named_parameters() if p.ndim >= 2 and "token_emb" not in n]
    no_decay = [p for n, p in palm.named_parameters() if p.ndim < 2 or "token_emb" in n]
    return torch.optim.AdamW(
        [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def train(cfg: TrainLMConfig):
    """The whole run, in order (data, model, the loop, the end), so that a reader sees the loop."""
    out_dir = Path(cfg.out_dir)
    accelerator = script_accelerator(cfg, cfg.batch_size)
    try:
        with accelerator.main_process_first():  # one process tokenizes, the others read its cache
            tokenizer = build_tokenizer(cfg, out_dir, accelerator.is_main_process)
            train_windows = TokenWindows(corpus_token_file(cfg.corpus, "train", tokenizer, cfg.cache_dir), cfg.seq_len)
            valid_file = corpus_token_file(cfg.corpus, "valid", tokenizer, cfg.cache_dir)
            valid_windows = TokenWindows(valid_file, cfg.seq_len)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"train_lm.py: {error}") from None
    valid_bytes_per_token = bytes_per_token(valid_file)

    palm = PaLM.from_config(PaLMConfig.from_name(cfg.preset, num_tokens=tokenizer.vocab_size, pad_id=tokenizer.pad_id))
    palm.tokenizer = tokenizer
    optimizer = build_optimizer(palm, cfg)
    # not handed to accelerator.prepare, which would step it once per process: the schedule counts
    # optimizer steps, whatever the number of processes
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    n_params = sum(p.numel() for p in palm.parameters())  # before ZeRO-3 leaves each process its part
    palm, optimizer = accelerator.prepare(palm, optimizer)
    unwrapped = accelerator.unwrap_model(palm)
    run = Run(cfg, accelerator, name="lm", total=cfg.steps, model=palm, optimizer=optimizer, scheduler=scheduler,
              extra_state=lambda: dict(train_config=asdict(cfg)), checkpoint_config=asdict(unwrapped.config),
              plot=[["train_loss", "val_loss"], ["val_bpb"], ["lr"]], plot_file="loss.png")

    accelerator.print(f"PaLM {cfg.preset}: {n_params / 1e6:.2f}M parameters, {len(train_windows) / 1e6:.1f}M training tokens "
                      f"({tokenizer.vocab_size}-token {type(tokenizer).__name__}, {valid_bytes_per_token:.2f} bytes per token), "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    for step in run:
        started = time.perf_counter()
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(palm):
                batch = train_windows.batch(cfg.batch_size, step=step * cfg.grad_accum + micro, seed=cfg.seed,
                                            rank=accelerator.process_index)
                loss = palm(batch.to(accelerator.device), return_loss=True)
                mean_loss = accelerator.reduce(loss.detach(), "mean")
                run.check_loss(mean_loss, step)
                accelerator.backward(loss)  # Accelerate divides by grad_accum here
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(palm.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens_per_s = tokens_per_step / (time.perf_counter() - started)
        run.log(step + 1, train_loss=mean_loss, lr=scheduler.get_last_lr()[0], tokens_per_s=tokens_per_s)
        run.postfix(loss=mean_loss, tok_s=tokens_per_s)

        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(palm, valid_windows, cfg, accelerator)
            val_bpb = val_loss / math.log(2) / valid_bytes_per_token
            run.log(done, val_loss=val_loss, val_bpb=val_bpb)
            run.write(f"step {done}: val loss {val_loss:.4f}, {val_bpb:.3f} bits/byte")
        if done % cfg.sample_every == 0 or done == cfg.steps:
            sample = sample_text(unwrapped, cfg, tokenizer)  # on every process: sharded weights decode together
            run.write(f"step {done} sample: {sample!r}")

    def save_final(final):
        weights = full_state_dict(accelerator, palm)  # on every process: gathers FSDP / ZeRO-3 shards
        if accelerator.is_main_process:
            unwrapped.save(final, state_dict=weights)

    final = run.finish(save_final)
    accelerator.print(f"final model in {final}; metrics in {out_dir / 'metrics.csv'}, plot {out_dir / 'loss.png'}")


if __name__ == "__main__":
    train(parse_config(TrainLMConfig))
