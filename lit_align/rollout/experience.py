"""``Experience``: one batch of prompts, the completions sampled for them, and what scoring found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Experience:
    """``B`` prompts with ``group_size`` completions each: ``N = B x group_size`` completions of at most ``R`` tokens,
    the completions of a prompt consecutive (completion ``i`` answers prompt ``i // group_size``).

    Filled by :meth:`~lit_align.rollout.RolloutStage.sample` (``prompt_*``, ``references``, ``completion_*``,
    ``has_eos``, ``sampler_logps``) and :meth:`~lit_align.rollout.RolloutStage.score` (``scores``, ``rewards``); the
    methods add what they compute from it (log-probs, values, advantages) in their own records.
    """

    prompt_ids: list[list[int]]  # [B] each prompt's real tokens
    prompt_text: list[str]  # [B]
    references: list[str] | None  # [B] the data's reference answers, when it has them
    group_size: int
    completion_ids: torch.Tensor  # [N, R] padded after each completion's first EOS
    completion_mask: torch.Tensor  # [N, R] 1 up to and including the first EOS
    completion_text: list[str]  # [N] decoded, special tokens skipped (what reward functions read)
    has_eos: torch.Tensor  # [N] bool: the completion ended (else it was cut at max_new_tokens)
    sampler_logps: torch.Tensor | None = None  # [N, R] the sampling engine's own log-probs, when it returns them
    scores: torch.Tensor | None = None  # [N, F] each reward function's (or the reward model's) scores, as scored
    rewards: torch.Tensor | None = None  # [N] their weighted sum, less the missing-EOS penalty

    @property
    def width(self) -> int:
        """``R``: the longest completion's length (the completion tensors' width)."""
        return self.completion_ids.shape[1]

    def rows(self, prompts: Sequence[int]) -> torch.Tensor:
        """``[len(prompts) x group_size]`` indices of the completions of the given prompts, in order."""
        g = self.group_size
        return torch.tensor([p * g + k for p in prompts for k in range(g)], device=self.completion_ids.device)

    def examples(self, prompts: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """``{"prompt_ids", "response_ids"}`` per prompt (its completions' real tokens), for packing."""
        lengths = self.completion_mask.sum(-1).tolist()
        ids, g = self.completion_ids.tolist(), self.group_size
        return [{"prompt_ids": self.prompt_ids[p],
                 "response_ids": [ids[i][: lengths[i]] for i in range(p * g, (p + 1) * g)]}
                for p in (range(len(self.prompt_ids)) if prompts is None else prompts)]  # fmt: skip
