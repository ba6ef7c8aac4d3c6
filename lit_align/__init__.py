"""lit_align: post-training alignment of language models (SFT, reward models, PPO, DPO, GRPO) on PyTorch Lightning.

The names below are imported on first use, so that ``import lit_align.losses`` (the pure maths) loads neither
Lightning nor the data layer."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AlignModule": "lit_align.modules",
    "DPOModule": "lit_align.modules",
    "DistillModule": "lit_align.modules",
    "GRPOModule": "lit_align.modules",
    "KTOModule": "lit_align.modules",
    "LoRA": "lit_align.modules",
    "OnlineDPOModule": "lit_align.modules",
    "PPOModule": "lit_align.modules",
    "RewardModule": "lit_align.modules",
    "RewardScorer": "lit_align.modules",
    "SFTModule": "lit_align.modules",
    "InstructionDataModule": "lit_align.data",
    "PreferenceDataModule": "lit_align.data",
    "PromptDataModule": "lit_align.data",
    "UnpairedDataModule": "lit_align.data",
    "load_causal_lm": "lit_align.models",
    "load_tokenizer": "lit_align.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_align' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
