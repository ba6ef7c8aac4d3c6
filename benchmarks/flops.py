"""Model FLOPs a training or scoring step actually performs on a Llama-shaped decoder, from the shapes of its batches.

Pure arithmetic (no torch, no Lightning): the benchmark workers record the padded rectangle of every forward pass
they run and hand it here, so an MFU computed from these counts is work done over time over the machine's matmul
rate, and cannot exceed 100% except by measurement noise.

One forward pass over a padded rectangle of ``rows x T`` tokens (``d`` hidden, ``f`` intermediate, ``L`` layers,
``h`` query heads, ``g`` key/value heads, ``e = d / h`` head dimension, ``V`` vocabulary) costs

- linear layers, per token and layer: ``2 * (d*h*e + 2*d*g*e + h*e*d + 3*d*f)`` (q, k, v, o projections and the
  gate, up and down projections; a multiply-add is 2 FLOPs), at every position of the rectangle, padding included
  (the matmuls run over the whole padded tensor);
- attention, per row, layer and query head: ``2 * 2 * T * T * e`` (the scores ``Q K^T`` and the weighted sum
  ``P V``). The whole ``T x T`` rectangle is counted: every batch here carries an explicit mask (padding, or the
  block mask of prompt-shared rows), and the masked SDPA kernels (the CPU flash kernel, the math kernel, eager
  attention) compute every score and discard the masked ones afterwards; nothing skips the causal upper half. It
  is also the convention of PaLM's MFU (``12 * L * d * T`` per token, forward and backward). Grouped-query
  attention shares ``k`` and ``v`` across heads but the scores are still computed per query head;
- the head at the positions where it is computed: ``2 * d * V`` per position for the unembedding, ``2 * d`` for a
  reward model's scalar head. lit_align computes log-probs only at the positions that predict scored tokens; TRL
  1.16's fused log-prob head scores every position but the last of each row on a CPU (it compacts to the labelled
  positions only on Triton devices), and a Hugging Face ``*ForSequenceClassification`` model applies its scalar head
  at every position;
- a decoding step of generation with ``context`` keys cached: the linear layers at its new positions only, and
  attention of those positions over ``context`` + new keys;
- embedding lookups, norms, rotary embeddings, softmax and the loss: not counted (no matmul; under 1% at these
  shapes).

Backward costs twice the forward (the gradient with respect to the input and to the weights, each a matmul of the
forward's size) for a pass whose parameters are trained; a frozen pass (reference model, ``torch.no_grad``) costs
its forward only. A tiled log-prob head that does not keep the ``[positions, V]`` logits (lit_align's
``linear_log_probs``, TRL's ``ChunkedLogProbFunction``) recomputes them in backward: one more head forward
(``recompute_head``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama-shaped decoder that set its FLOPs (and, with ``tied``, its parameter count)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    head_dim: int | None = None  # hidden // heads unless the config says otherwise

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}; give head_dim")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's linear layers: q, k, v, o and gate, up, down."""
        e = self.dim_per_head
        attention = self.hidden * e * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    def params(self) -> int:
        """All parameters of the causal LM: embedding, blocks (linear layers and two RMSNorm weights each), the final
        norm, and the unembedding unless it is tied to the embedding."""
        blocks = self.layers * (self.layer_matmul_params + 2 * self.hidden)
        return self.vocab * self.hidden * (1 if self.tied else 2) + blocks + self.hidden

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        """From a Hugging Face ``LlamaConfig`` (or anything with its attribute names, or a mapping of them)."""
        get = config.get if isinstance(config, Mapping) else lambda name, default=None: getattr(config, name, default)
        return cls(
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            layers=get("num_hidden_layers"),
            heads=get("num_attention_heads"),
            kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            vocab=get("vocab_size"),
            tied=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
        )


@dataclass(frozen=True)
class Pass:
    """One forward pass (and its backward when ``trained``) over a padded ``rows x length`` rectangle.

    Args:
        rows: rows of the batch tensor (``input_ids.shape[0]``).
        length: padded length (``input_ids.shape[1]``).
        head: ``"lm"`` (unembedding to the vocabulary), ``"score"`` (a scalar reward/value head) or ``None``.
        head_positions: positions where the head is computed; ``None`` means every position of the rectangle.
        trained: the pass's parameters get gradients (forward + backward, 3x); ``False``: forward only.
        recompute_head: the head's logits are recomputed in backward (tiled log-prob kernels).
        context: keys and values already cached for each row (a decoding step of generation: ``length`` new
            positions attend to ``context + length`` keys).
        body: ``False`` for the head alone, applied to ``head_positions`` hidden states that a separate pass
            produced (a log-prob kernel called outside the model's forward; generation's logits): no blocks.
    """

    rows: int
    length: int
    head: Literal["lm", "score"] | None = "lm"
    head_positions: int | None = None
    trained: bool = True
    recompute_head: bool = False
    context: int = 0
    body: bool = True

    def __post_init__(self) -> None:
        if self.rows < 0 or self.length < 0 or self.context < 0:
            raise ValueError(f"Pass rows, length and context must be >= 0, got {self.rows}, {self.length}, "
                             f"{self.context}")  # fmt: skip
        if not self.body and self.head_positions is None:
            raise ValueError("a head-only Pass (body=False) needs head_positions")
        if self.body and self.head_positions is not None and not 0 <= self.head_positions <= self.rows * self.length:
            raise ValueError(f"Pass head_positions {self.head_positions} outside 0..{self.rows * self.length}")


def linear_flops(shape: LlamaShape, tokens: int) -> int:
    """``2 * L * (linear weights per block) * tokens``: the blocks' projections over ``tokens`` positions."""
    return 2 * shape.layers * shape.layer_matmul_params * tokens


def attention_flops(shape: LlamaShape, rows: int, q_len: int, k_len: int | None = None) -> int:
    """``2 * 2 * q_len * k_len * e`` per row, layer and query head: scores and weighted sum over the whole
    ``q_len x k_len`` rectangle (see the module docstring for why the masked part is counted)."""
    k_len = q_len if k_len is None else k_len
    return 4 * shape.layers * shape.heads * shape.dim_per_head * rows * q_len * k_len


def head_flops(shape: LlamaShape, positions: int, head: Literal["lm", "score"] | None = "lm") -> int:
    """``2 * d * out * positions`` with ``out`` = the vocabulary for ``"lm"``, 1 for ``"score"``, 0 for ``None``."""
    out = {"lm": shape.vocab, "score": 1, None: 0}[head]
    return 2 * shape.hidden * out * positions


def forward_flops(shape: LlamaShape, p: Pass) -> dict[str, int]:
    """FLOPs of ``p``'s forward alone, by part: ``{"linear", "attention", "head"}``."""
    tokens = p.rows * p.length if p.body else 0
    positions = tokens if p.head_positions is None else p.head_positions
    return {
        "linear": linear_flops(shape, tokens),
        "attention": attention_flops(shape, p.rows, p.length, p.context + p.length) if p.body else 0,
        "head": head_flops(shape, positions, p.head),
    }


def pass_flops(shape: LlamaShape, p: Pass) -> int:
    """Forward, plus backward (2x the forward) when trained, plus the head's recomputation in backward."""
    forward = forward_flops(shape, p)
    total = sum(forward.values())
    if p.trained:
        total += 2 * total + (forward["head"] if p.recompute_head else 0)
    return total


def step_flops(shape: LlamaShape, passes: Iterable[Pass]) -> int:
    """Total FLOPs of the passes of one step."""
    return sum(pass_flops(shape, p) for p in passes)


def as_pass(record: Mapping[str, Any] | Pass) -> Pass:
    """A :class:`Pass` from its field mapping (the JSON a worker writes), or the pass itself."""
    return record if isinstance(record, Pass) else Pass(**record)
