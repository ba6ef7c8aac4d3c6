"""Pure loss and log-probability functions: plain torch, no Lightning, each with its shapes and source.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss of a reward model (Ouyang et al. 2022, eq. 1; Llama 2's optional margin).

    ``loss = -log sigmoid(r_chosen - r_rejected - margin)``, per pair, in fp32 whatever the input dtype; finite for
    any finite rewards (``logsigmoid`` never takes the log of an underflowed sigmoid).

    Args:
        chosen_rewards: ``[P]`` rewards of the preferred responses.
        rejected_rewards: ``[P]`` rewards of the other responses.
        margin: ``[P]`` or scalar margin the chosen reward should exceed the rejected by; ``None`` for none.

    Returns:
        ``[P]`` per-pair losses.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=torch.float32, device=diff.device)
    return -F.logsigmoid(diff)


def grouped_mean(values: torch.Tensor, group: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
    """Mean of ``values [P]`` within each group, ``group [P]`` holding group indices ``0..G-1``; returns ``[G]``
    (empty groups give 0)."""
    n_groups = int(group.max()) + 1 if n_groups is None else n_groups
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values)
    )
    return sums / counts.clamp(min=1)


def kwise_bradley_terry_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """InstructGPT's K-wise reward loss: each prompt's K ranked responses give all C(K, 2) pairs; the Bradley-Terry
    loss is averaged over a prompt's pairs, then over prompts, so every prompt weighs the same however large its K.

    Args:
        rewards: ``[N]`` one reward per response (each response forwarded once).
        better, worse: ``[P]`` indices into ``rewards`` of each pair's preferred and other response.
        group: ``[P]`` the prompt of each pair.

    Returns:
        the scalar loss.
    """
    pair_losses = bradley_terry_loss(rewards[better], rewards[worse], margin)
    return grouped_mean(pair_losses, group).mean()
