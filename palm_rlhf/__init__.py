from palm_rlhf.dpo import DPOTrainer
from palm_rlhf.grpo import GRPOTrainer
from palm_rlhf.implicit_prm import ImplicitPRM
from palm_rlhf.palm import PaLM, PaLMConfig
from palm_rlhf.ppo import ActorCritic, RLHFTrainer
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = ["PaLM", "PaLMConfig", "RewardModel", "RLHFTrainer", "ActorCritic", "ImplicitPRM", "GRPOTrainer",
           "DPOTrainer", "ByteTokenizer", "BPETokenizer", "train_bpe", "load_tokenizer", "PAD_ID", "EOS_ID"]
