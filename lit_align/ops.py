"""Pure tensor operations shared by the maths, the data and the methods: the ignore index, padding, position ids,
the attention mask of packed rows, completion masks, and packing a prompt with its responses. Plain torch: nothing
here imports Lightning or the rest of lit_align."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

IGNORE_INDEX = -100
"""The label of a position that takes no loss (prompt tokens, padding), as torch's cross-entropy ignores it."""


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


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[N, R]`` 1 on completion tokens up to and including the first EOS (all tokens when there is none)."""
    is_eos = (completion_ids == eos_token_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def pack_responses(
    examples: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_token_id: int,
    share_prompt: bool = False,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Rows for scoring each ``(prompt_ids, [response_ids, ...])`` example's responses, the prompt forwarded once
    per response or, with ``share_prompt``, once per example.

    - ``share_prompt=False``: one row per response, ``prompt + response``, padded; ``labels`` (response tokens only).
    - ``share_prompt=True``: one row per example, ``prompt + response_1 + ... + response_K``; ``segment_ids`` (0
      prompt, k for response k, -1 padding) says which tokens may see which (:func:`packed_attention_mask`): a
      response attends to the prompt and to its own earlier tokens, never to another response. Each response's
      positions continue from the end of the prompt, so every response sees exactly what it would see alone.

    Both layouts give ``input_ids``, ``attention_mask`` and ``position_ids`` ``[rows, T]``, and the same flat index
    of the M scored response tokens: ``target_row``, ``target_col`` (the position whose output predicts the token:
    the previous token of the response, or the prompt's last token for a response's first token), ``target_id`` and
    ``target_response`` (which of the N responses, ``0..N-1`` in example order), all ``[M]``; per response
    ``response_row`` and ``response_end`` (its last token, where a reward model reads its score) and
    ``response_lengths`` (scored tokens), all ``[N]``.
    """
    rows, segments, positions = [], [], []
    target_row, target_col, target_id, target_response = [], [], [], []
    response_row, response_end, response_lengths = [], [], []
    n = 0
    for prompt, responses in examples:
        prompt = list(prompt)
        if share_prompt:
            rows.append(list(prompt))
            segments.append([0] * len(prompt))
            positions.append(list(range(len(prompt))))
        for k, response in enumerate(responses):
            if not share_prompt:
                rows.append(list(prompt))
                segments.append([0] * len(prompt))
                positions.append(list(range(len(prompt))))
            row, start = len(rows) - 1, len(rows[-1])
            rows[row] += response
            segments[row] += [k + 1] * len(response)
            positions[row] += range(len(prompt), len(prompt) + len(response))
            # token t of the response is predicted at its previous token: the prompt's last for t == 0
            predictors = [len(prompt) - 1] + list(range(start, start + len(response) - 1))
            scored = [(col, tok) for col, tok in zip(predictors, response) if col >= 0]
            target_row += [row] * len(scored)
            target_col += [col for col, _ in scored]
            target_id += [tok for _, tok in scored]
            target_response += [n] * len(scored)
            response_row.append(row)
            response_end.append(start + len(response) - 1)
            response_lengths.append(len(scored))
            n += 1
    width = max(len(r) for r in rows)
    if padding_side == "left":  # shift every column index by the row's padding
        shift = [width - len(r) for r in rows]
        target_col = [c + shift[r] for r, c in zip(target_row, target_col)]
        response_end = [c + shift[r] for r, c in zip(response_row, response_end)]
    batch = {
        "input_ids": pad_sequences(rows, pad_token_id, padding_side),
        "attention_mask": pad_sequences([[1] * len(r) for r in rows], 0, padding_side),
        "position_ids": pad_sequences(positions, 0, padding_side),
    }
    if share_prompt:
        batch["segment_ids"] = pad_sequences(segments, -1, padding_side)
    else:
        labels = [[IGNORE_INDEX if s == 0 else t for s, t in zip(seg, r)] for seg, r in zip(segments, rows)]
        batch["labels"] = pad_sequences(labels, IGNORE_INDEX, padding_side)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    batch.update(
        target_row=as_long(target_row),
        target_col=as_long(target_col),
        target_id=as_long(target_id),
        target_response=as_long(target_response),
        response_row=as_long(response_row),
        response_end=as_long(response_end),
        response_lengths=as_long(response_lengths),
    )
    return batch
