"""Batching tokenized examples with dynamic padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lit_align.data.tokenize import IGNORE_INDEX


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    value: int,
    side: Literal["right", "left"] = "right",
    multiple_of: int | None = None,
) -> torch.Tensor:
    """A ``[batch, length]`` long tensor of ``sequences`` padded with ``value`` to the longest (rounded up to
    ``multiple_of``)."""
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            if side == "right":
                out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            else:
                out[i, length - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (0 for the first real token of each row), so that left padding does
    not shift positions. Pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean attention mask (True = may attend) for rows packing a prompt (segment 0) and several
    responses (segments 1..K), padding -1: causal, and a response sees the prompt and its own earlier tokens only.
    Every position also sees itself, so no softmax row is empty (padding rows stay finite)."""
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    visible = (seg_k == 0) | (seg_k == seg_q)
    mask = causal & visible & (seg_k >= 0) | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return mask[:, None]


@dataclass
class SFTCollator:
    """Pads ``{"input_ids", "labels"}`` examples into a batch with ``attention_mask`` and ``position_ids``.

    Labels are padded with ``IGNORE_INDEX``, never derived from ``input_ids == pad_token_id``, so a labelled EOS
    survives when the tokenizer pads with EOS.

    Args:
        pad_token_id: id written at pad positions of ``input_ids``.
        padding_side: ``"right"`` (training) or ``"left"``.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly shapes).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        pad = dict(side=self.padding_side, multiple_of=self.pad_to_multiple_of)
        input_ids = pad_sequences(ids, self.pad_token_id, **pad)
        attention_mask = pad_sequences([[1] * len(s) for s in ids], 0, **pad)
        labels = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, **pad)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "labels": labels,
        }
