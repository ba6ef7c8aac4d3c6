"""Batching tokenized examples with dynamic padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lit_align.ops import IGNORE_INDEX, pad_sequences, position_ids_from_mask


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
