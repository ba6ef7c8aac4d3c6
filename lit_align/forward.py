"""Forward passes the methods share, through any Hugging Face model, whole or sharded: the backbone's hidden states
(packed rows with block masks), log-probabilities through the tiled unembedding (never ``[tokens, vocabulary]``
logits for a plain head), labelled NLL, response log-probs, and scalar heads (rewards, values). Each runs as one
FSDP forward of the model's root when it is sharded (:func:`lit_align.parallel.model_forward`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_align.losses import linear_log_probs, selective_log_softmax
from lit_align.models import unwrap_model
from lit_align.ops import IGNORE_INDEX, packed_attention_mask, position_ids_from_mask
from lit_align.parallel import model_forward, run_forward


def backbone_hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, T, H]`` final hidden states of ``model``'s transformer (no unembedding) for a batch from
    :class:`~lit_align.data.PreferenceCollator`: packed rows (``segment_ids``) get their block attention mask, other
    rows their padding mask."""
    lm = unwrap_model(model)
    if "segment_ids" in batch:
        attention_mask = packed_attention_mask(batch["segment_ids"])
        implementation = getattr(lm.config, "_attn_implementation", "sdpa") or "sdpa"
        if implementation == "eager":  # eager attention adds the mask to the scores
            dtype = next(lm.parameters()).dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        elif implementation != "sdpa":
            raise ValueError(
                f"share_prompt needs an attention implementation that takes a custom mask (sdpa or eager); this "
                f"model uses {implementation!r}. Set share_prompt: false (on the PreferenceDataModule; for GRPO on the "
                "GRPOModule)."
            )
    else:
        attention_mask = batch["attention_mask"]
    out = lm.base_model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask,
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out[0]


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """``(final_logit_softcapping, logit_scale)`` that some families apply after the unembedding (Gemma 2/3,
    Cohere, Granite, ...), read the way their ``forward`` reads them."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1 / config.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def unembedding_logps(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    return_correct: bool = False,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``[M]`` fp32 log-probabilities of ``targets [M]`` given the final hidden states ``[M, H]`` that predict them,
    through ``model``'s unembedding (logits divided by ``temperature``); tiled
    (:func:`~lit_align.losses.linear_log_probs`) for a plain linear head. Optionally also ``[M]`` booleans (the
    target is the top token) and ``[M]`` entropies, in that order."""
    lm = unwrap_model(model)
    head = lm.get_output_embeddings()
    softcap, scale = _logit_transform(lm.config)

    def tiled(hidden: torch.Tensor) -> Any:
        weight = getattr(head, "weight", None)
        if type(weight) is not nn.Parameter or weight.dim() != 2 or weight.numel() == 0:
            return None  # a weight partitioned by its owner (ZeRO-3): only calling the module gathers it
        return linear_log_probs(
            hidden, weight, targets, head.bias, temperature=temperature, return_correct=return_correct,
            return_entropy=return_entropy,
        )  # fmt: skip

    if isinstance(head, nn.Linear) and softcap is None and scale == 1.0:
        # A head sharded as an FSDP unit of its own is gathered for this, and its gradient reduce-scattered.
        out = run_forward(head, tiled, hidden)
        if out is not None:
            return out
    # Sharded (ZeRO-3, DTensor) or transformed heads: call the module, which gathers its own weights.
    logits = head(hidden) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logps = selective_log_softmax(logits, targets)
    extras = []
    if return_correct:
        extras.append(logits.detach().argmax(-1) == targets)
    if return_entropy:
        logp_all = torch.log_softmax(logits.detach().float(), -1)
        extras.append(-(logp_all.exp() * logp_all).sum(-1))
    return (logps, *extras) if extras else logps


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a ``*ForSequenceClassification`` reward or value model (``score`` or ``classifier``)."""
    lm = unwrap_model(model)
    for name in ("score", "classifier"):
        if isinstance(getattr(lm, name, None), nn.Module):
            return getattr(lm, name)
    raise ValueError(f"{type(lm).__name__} has no scalar head (score or classifier) to read rewards or values from")


@model_forward
def labelled_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(loss, n_correct, n_tokens)``: the mean negative log-likelihood of a batch's labelled tokens (``labels``
    with ``IGNORE_INDEX`` elsewhere, the same value as :func:`~lit_align.losses.sft_loss`), with the unembedding run
    only at the positions that predict them, and how many of those tokens are the top prediction."""
    targets = batch["labels"][:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    hidden = backbone_hidden_states(model, batch)
    logps, correct = unembedding_logps(model, hidden[rows, cols], targets[rows, cols], return_correct=True)
    n_tokens = torch.tensor(len(rows), device=logps.device)
    loss = -logps.sum() / n_tokens.clamp(min=1)
    if len(rows) == 0:  # keep the graph connected: a zero loss, not a failed backward
        loss = loss + hidden.sum() * 0.0
    return loss, correct.sum(), n_tokens


@model_forward
def response_logps(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N]`` summed fp32 log-probability ``log pi(y|x)`` of each response in a
    :class:`~lit_align.data.PreferenceCollator` batch. The unembedding runs only at the positions that predict
    response tokens."""
    hidden = backbone_hidden_states(model, batch)
    token_logps = unembedding_logps(model, hidden[batch["target_row"], batch["target_col"]], batch["target_id"])
    n = batch["response_lengths"].shape[0]
    return token_logps.new_zeros(n).index_add(0, batch["target_response"], token_logps)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each row's last real token, for left or right padding alike, and whatever the pad id (the
    mask, not the ids, says what is padding, so pad == eos is safe)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


@model_forward
def sequence_rewards(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[N]`` fp32 scalar reward of each sequence: the scalar head applied to the hidden state of its last real
    token. ``model`` is a ``*ForSequenceClassification`` with one label (its own pooling, which locates the last token
    by comparing ids with the pad id, is bypassed)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return score_head(model)(last).squeeze(-1).float()


@model_forward
def response_rewards(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N]`` fp32 raw rewards of the responses of a :class:`~lit_align.data.PreferenceCollator` batch: the scalar
    head on the hidden state of each response's last token (``response_row``, ``response_end``)."""
    hidden = backbone_hidden_states(model, batch)
    return score_head(model)(hidden[batch["response_row"], batch["response_end"]]).squeeze(-1).float()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) within the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
