"""The rollout stage every on-policy method shares: sampling through a :class:`Generator` (Hugging Face ``generate``
or vLLM), one :class:`Experience` record, scoring, packing a prompt with its completions, and completion log-probs.
Used by composition: a method holds a :class:`RolloutStage`."""

from lit_align.rollout.experience import Experience
from lit_align.rollout.generators import Completions, Generator, HFGenerator, KeyedSampling, completion_seeds
from lit_align.rollout.stage import RolloutStage, TokenLogps, to_completions

__all__ = [
    "Completions",
    "Experience",
    "Generator",
    "HFGenerator",
    "KeyedSampling",
    "RolloutStage",
    "TokenLogps",
    "VLLMGenerator",
    "completion_seeds",
    "to_completions",
]


def __getattr__(name: str):
    if name == "VLLMGenerator":  # imports vLLM lazily: it is an optional dependency
        from lit_align.rollout.vllm import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(f"module 'lit_align.rollout' has no attribute {name!r}")
