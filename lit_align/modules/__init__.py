"""The LightningModules, one per alignment method, on a thin shared base."""

from lit_align.modules.base import AlignModule, LoRA
from lit_align.modules.distill import DistillModule
from lit_align.modules.dpo import DPOModule
from lit_align.modules.grpo import GRPOModule
from lit_align.modules.kto import KTOModule
from lit_align.modules.online_dpo import OnlineDPOModule
from lit_align.modules.ppo import PPOModule
from lit_align.modules.reward import RewardModule, RewardScorer
from lit_align.modules.sft import SFTModule

__all__ = [
    "AlignModule",
    "DPOModule",
    "DistillModule",
    "GRPOModule",
    "KTOModule",
    "LoRA",
    "OnlineDPOModule",
    "PPOModule",
    "RewardModule",
    "RewardScorer",
    "SFTModule",
]
