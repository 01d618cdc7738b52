"""palm-rlhf: a PaLM, LoRA scopes, reward models, PPO, GRPO / RLOO, DPO, an implicit PRM; see README.md."""
from palm_rlhf import compat
from palm_rlhf.dpo import DPOConfig, DPOTrainer
from palm_rlhf.grpo import GRPOConfig, GRPOTrainer
from palm_rlhf.implicit_prm import ImplicitPRM
from palm_rlhf.model import PaLM, PaLMConfig
from palm_rlhf.ppo import ActorCritic, PPOConfig, RLHFTrainer
from palm_rlhf.reward import RewardEnsemble, RewardModel
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

compat.install()

__all__ = ["PaLM", "PaLMConfig", "RewardModel", "RewardEnsemble", "RLHFTrainer", "PPOConfig", "ActorCritic",
           "ImplicitPRM", "GRPOTrainer", "GRPOConfig", "DPOTrainer", "DPOConfig", "ByteTokenizer", "BPETokenizer",
           "train_bpe", "load_tokenizer", "PAD_ID", "EOS_ID"]
