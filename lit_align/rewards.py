"""Reward functions for on-policy training: ``reward(prompts, responses, references=None) -> [N]`` tensors.

A trained reward model (:class:`~lit_align.modules.reward.RewardScorer`) is one; programmatic rewards are others.
In YAML, name one with ``class_path`` (``lit_align.rewards.*`` is on the CLI's import allow-list).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class RewardFunction:
    """Base of programmatic rewards: ``reward(prompts, responses, references=None) -> [N]`` fp32 scores on text.
    ``references`` are the data's reference answers, one per response, when the ``PromptDataModule`` has a
    ``reference_field``. Subclass it (so that configs can name yours with ``class_path``), or pass any such callable
    from Python (a two-argument one works where the data has no references)."""

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


def score_text(
    fn: Callable[..., torch.Tensor | Sequence[float]],
    prompts: Sequence[str],
    responses: Sequence[str],
    references: Sequence[str] | None = None,
) -> torch.Tensor:
    """``[N]`` fp32 scores of ``fn`` (given ``references`` only when there are some), checked for shape and finite
    values, so a faulty reward is named instead of turning into a NaN loss."""
    scores = fn(prompts, responses) if references is None else fn(prompts, responses, references=references)
    name = getattr(fn, "__name__", type(fn).__name__)
    if isinstance(scores, torch.Tensor):
        if scores.is_complex():
            raise ValueError(f"reward function {name} returned a {scores.dtype} tensor; it must return real numbers")
        scores = scores.detach().to(torch.float32)
    else:
        if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence | np.ndarray):
            raise ValueError(
                f"reward function {name} returned {type(scores).__name__}; it must return one number per response "
                f"({len(responses)}), as a list or tensor"
            )
        for i, value in enumerate(scores):
            if not isinstance(value, numbers.Real):
                raise ValueError(f"reward function {name} returned {value!r} for response {i}; scores must be numbers")
        scores = torch.tensor([float(v) for v in scores], dtype=torch.float32)
    if scores.shape != (len(responses),):
        raise ValueError(f"reward function {name} returned shape {tuple(scores.shape)} for {len(responses)} responses")
    if not torch.isfinite(scores).all():
        raise ValueError(f"reward function {name} returned a non-finite score: {scores.tolist()}")
    return scores


class CharacterFractionReward(RewardFunction):
    """The fraction of a response's characters that are in ``characters`` (0 for an empty response): a dense,
    programmatic reward that a small model can learn to earn, for testing RL end to end.

    Args:
        characters: the characters that earn reward.
    """

    def __init__(self, characters: str = " ") -> None:
        self.characters = set(characters)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], references: Any = None) -> torch.Tensor:
        scores = [sum(c in self.characters for c in r) / len(r) if r else 0.0 for r in responses]
        return torch.tensor(scores, dtype=torch.float32)


class LengthReward(RewardFunction):
    """``-|len(response) - target| / target`` in characters: rewards responses of about ``target`` characters.

    Args:
        target: the preferred length in characters.
    """

    def __init__(self, target: int = 40) -> None:
        self.target = target

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], references: Any = None) -> torch.Tensor:
        return torch.tensor([-abs(len(r) - self.target) / self.target for r in responses], dtype=torch.float32)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str, marker: str | None = "####") -> float | None:
    """The answer number of a text: the first number after the last ``marker`` when there is one (GSM8K writes
    ``#### 72``), else the last number in the text; thousands separators are ignored. ``None`` if there is none."""
    if marker and marker in text:
        numbers = _NUMBER.findall(text.rsplit(marker, 1)[1])[:1]
    else:
        numbers = _NUMBER.findall(text)[-1:]
    return float(numbers[0].replace(",", "")) if numbers else None


class NumericAnswerReward(RewardFunction):
    """1.0 when a response's answer number equals its reference's, else 0.0: the rule-based outcome reward of
    GSM8K-style maths (Cobbe et al. 2021; DeepSeekMath's GRPO and R1 train on such verifiable rewards). Numbers are
    read by :func:`final_number`: after the last ``marker``, else the last number.

    Args:
        marker: the text that precedes the final answer (GSM8K: ``####``), in references and responses alike.
        tolerance: absolute difference still counted as equal.
    """

    def __init__(self, marker: str | None = "####", tolerance: float = 1e-6) -> None:
        self.marker, self.tolerance = marker, tolerance

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> torch.Tensor:
        if references is None:
            raise ValueError(
                "NumericAnswerReward needs reference answers: set reference_field on the PromptDataModule "
                "(GSM8K: reference_field: answer)"
            )
        scores = []
        for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
            expected = final_number(reference, self.marker)
            if expected is None:
                raise ValueError(f"reference {i} holds no number to compare with: {reference[-200:]!r}")
            got = final_number(response, self.marker)
            scores.append(float(got is not None and abs(got - expected) <= self.tolerance))
        return torch.tensor(scores, dtype=torch.float32)
