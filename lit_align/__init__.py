"""lit_align: post-training alignment of language models (SFT, reward models, PPO, DPO, GRPO) on PyTorch Lightning."""

from lit_align.data import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_align.models import load_causal_lm, load_tokenizer
from lit_align.modules import AlignModule, DPOModule, GRPOModule, LoRA, PPOModule, RewardModule, RewardScorer, SFTModule

__version__ = "0.1.0"

__all__ = [
    "AlignModule",
    "DPOModule",
    "GRPOModule",
    "InstructionDataModule",
    "LoRA",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardModule",
    "RewardScorer",
    "SFTModule",
    "load_causal_lm",
    "load_tokenizer",
]
