"""Reward functions for on-policy training: ``reward(prompts, responses) -> [N]`` tensors.

A trained reward model (:class:`~lit_align.modules.reward.RewardScorer`) is one; programmatic rewards are others.
In YAML, name one with ``class_path`` (``lit_align.rewards.*`` is on the CLI's import allow-list).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RewardFunction:
    """Base of programmatic rewards: ``reward(prompts, responses) -> [N]`` fp32 scores on text. Subclass it (so that
    configs can name yours with ``class_path``), or pass any such callable from Python."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class CharacterFractionReward(RewardFunction):
    """The fraction of a response's characters that are in ``characters`` (0 for an empty response): a dense,
    programmatic reward that a small model can learn to earn, for testing RL end to end.

    Args:
        characters: the characters that earn reward.
    """

    def __init__(self, characters: str = " ") -> None:
        self.characters = set(characters)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        scores = [sum(c in self.characters for c in r) / len(r) if r else 0.0 for r in responses]
        return torch.tensor(scores, dtype=torch.float32)


class LengthReward(RewardFunction):
    """``-|len(response) - target| / target`` in characters: rewards responses of about ``target`` characters.

    Args:
        target: the preferred length in characters.
    """

    def __init__(self, target: int = 40) -> None:
        self.target = target

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([-abs(len(r) - self.target) / self.target for r in responses], dtype=torch.float32)
