"""Bits per byte of language models on the whole validation split of a corpus, each in its own
tokenizer's tokens: comparable across tokenizers (bytes, BPE), unlike a loss per token.

    python benchmarks/bits_per_byte.py --checkpoints runs/lm/final,runs/lm_bpe/final

The split is read as train_lm.py reads it (one EOS after each document, counted as one byte) and cut
into consecutive windows of --seq_len tokens; every token after the first of the split is predicted
once, from the tokens before it in its window.
"""
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from palm_rlhf import PaLM
from palm_rlhf.data import DEFAULT_CORPUS, bytes_per_token, corpus_token_file
from palm_rlhf.config import parse_config


@dataclass
class BitsPerByteConfig:
    """Bits per byte of each checkpoint on one corpus split."""

    checkpoints: str = field(default="runs/lm/final", metadata={"help": "model folders joined by ','"})
    corpus: str = field(default=DEFAULT_CORPUS, metadata={"help": "what train_lm.py --corpus takes"})
    split: str = field(default="valid", metadata={"help": "train or valid"})
    seq_len: int = field(default=256, metadata={"help": "tokens per window (train_lm.py's default)"})
    batch_size: int = field(default=16, metadata={"help": "windows per forward pass"})
    cache_dir: str | None = field(default=None, metadata={"help": "token-file cache (default ~/.cache/palm_rlhf)"})


@torch.no_grad()
def bits_per_byte(palm: PaLM, cfg) -> tuple[float, int, float]:
    """(bits per byte, tokens scored, bytes per token) of `palm` on the split, in its tokenizer."""
    path = corpus_token_file(cfg.corpus, cfg.split, palm.tokenizer, cfg.cache_dir)
    tokens = torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r").astype(np.int64))
    full = (len(tokens) - 1) // cfg.seq_len
    batches = []
    if full:
        windows = tokens[: full * cfg.seq_len + 1].unfold(0, cfg.seq_len + 1, cfg.seq_len)  # (full, seq_len + 1), overlapping by one
        batches = list(windows.split(cfg.batch_size))
    if len(tokens) - 1 > full * cfg.seq_len:
        batches.append(tokens[full * cfg.seq_len :][None])  # the shorter last window
    nll, count = 0.0, 0
    for batch in tqdm(batches, desc=palm.tokenizer.fingerprint, leave=False):
        logits = palm(batch[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    per_token = nll / count
    ratio = bytes_per_token(path)
    return per_token / math.log(2) / ratio, count, ratio


def main(cfg: BitsPerByteConfig):
    torch.set_grad_enabled(False)
    print(f"| checkpoint | tokenizer | bytes per token | tokens scored | bits per byte |\n| --- | --- | --- | --- | --- |")
    for path in cfg.checkpoints.split(","):
        palm = PaLM.from_pretrained(path.strip()).eval()
        try:
            bpb, count, ratio = bits_per_byte(palm, cfg)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"bits_per_byte.py: {error}") from None
        name = f"{type(palm.tokenizer).__name__} ({palm.tokenizer.vocab_size})"
        print(f"| {path} | {name} | {ratio:.3f} | {count} | {bpb:.4f} |", flush=True)


if __name__ == "__main__":
    main(parse_config(BitsPerByteConfig, sys.argv[1:]))
