"""Pure loss and log-probability functions: plain torch, no Lightning, each with its shapes and source.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

from lit_align.data.tokenize import IGNORE_INDEX

_LOGSUMEXP_CHUNK = 4096  # rows of [.., V] converted to fp32 at a time when logits are in half precision


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``dim``, or everything). Empty masks give 0, not NaN."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` in fp32 without materialising the ``[..., V]`` fp32 log-softmax.

    Args:
        logits: ``[..., V]`` in any float dtype.
        index: ``[...]`` token ids (any value where the result is ignored; it must be a valid id).

    Returns:
        ``[...]`` fp32 log-probabilities: the gathered logit minus the log-sum-exp over the vocabulary. Half-precision
        logits are upcast a chunk of rows at a time, so the fp32 temporary is at most ``chunk x V``.
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    if logits.dtype in (torch.float32, torch.float64):
        return picked - torch.logsumexp(logits, dim=-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in flat.split(_LOGSUMEXP_CHUNK)])
    return picked - lse.view(picked.shape)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities of ``labels`` under ``logits``.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[B, T]`` with ``IGNORE_INDEX`` where no log-prob is wanted (prompt, padding).

    Returns:
        ``(logps, mask)``, both ``[B, T - 1]``: fp32 log-probs of ``labels[:, 1:]`` (0 where masked) and the boolean
        mask of the labelled positions.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = selective_log_softmax(logits[:, :-1], targets.masked_fill(~mask, 0))
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, ``log pi(y|x)``.

    Returns:
        ``(logps, n_tokens)``, both ``[B]``: the fp32 sum of labelled tokens' log-probs, and how many there were.
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy averaged over labelled tokens (the SFT objective).

    Returns:
        ``(loss, n_correct, n_tokens)``: the scalar fp32 mean negative log-likelihood, and for token accuracy the
        number of labelled tokens whose argmax prediction is right and the number of labelled tokens.
    """
    logps, mask = token_logps(logits, labels)
    n_tokens = mask.sum()
    loss = -logps.sum() / n_tokens.clamp(min=1)
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
    return loss, correct.sum(), n_tokens
