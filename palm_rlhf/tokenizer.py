"""Byte-level tokenizer: ids 0..255 are raw UTF-8 bytes, then PAD and EOS.

Bytes need no vocabulary file and never meet an unknown symbol, which keeps every stage of the
pipeline offline. PAD and EOS differ from each other and from every byte, so padding can never be
confused with text or with the end of a response.
"""
import torch
from beartype import beartype

PAD_ID = 256
EOS_ID = 257
NUM_TOKENS = 258


class ByteTokenizer:
    pad_id = PAD_ID
    eos_id = EOS_ID
    num_tokens = NUM_TOKENS

    @beartype
    def encode(self, text: str, add_eos: bool = False) -> torch.Tensor:
        ids = list(text.encode("utf-8"))
        if add_eos:
            ids.append(EOS_ID)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """Decode ids (tensor or list); stops at the first EOS and drops PAD."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
