from palm_rlhf.palm import PaLM, PaLMConfig
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, ByteTokenizer

__all__ = ["PaLM", "PaLMConfig", "ByteTokenizer", "PAD_ID", "EOS_ID"]
