"""Sampling engines behind one small interface (:class:`Generator`), and keyed sampling: each completion drawn from
its own seed (:func:`completion_seeds`), whatever the engine, the batch or the ranks."""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from lit_align.models import unwrap_model
from lit_align.ops import position_ids_from_mask
from lit_align.parallel import needs_synced_steps


def completion_seeds(*stream: Any, keys: Sequence[int], num_samples: int) -> torch.Tensor:
    """``[len(keys) * num_samples]`` int64 seeds, one per completion: a hash of the ``stream`` (the run's seed, the
    epoch and batch, or validation and the step), the prompt's key (its index in the data) and the sample's index.
    A completion sampled from such a seed depends on nothing else: not on the batch it shares, not on how the batch
    is split over ranks, not on the global RNG (which a sampling engine may reseed), so sampling is the same on one
    rank or several, and in a resumed run."""
    prefix = repr(stream).encode()
    seeds = [
        int.from_bytes(hashlib.blake2b(prefix + repr((int(key), k)).encode(), digest_size=8).digest(), "little") >> 1
        for key in keys
        for k in range(num_samples)
    ]
    return torch.tensor(seeds, dtype=torch.int64)


class Completions(NamedTuple):
    """What a :class:`Generator` returns: ``ids`` ``[N, R]`` completion token ids (anything may follow a row's first
    EOS: it is masked), and ``logps`` ``[N, R]``, the sampler's own log-probabilities of those tokens (at the
    sampling temperature), or ``None`` when the engine is the trainer's own model."""

    ids: torch.Tensor
    logps: torch.Tensor | None = None


class Generator:
    """Samples completions: a small interface so that a faster engine (vLLM, ...) can replace Hugging Face
    ``generate`` without touching the maths. From ``[B, P]`` left-padded prompts it returns :class:`Completions`,
    ``B * num_samples`` of them, the ``num_samples`` completions of a prompt consecutive. ``seeds``
    (``[B * num_samples]``, see :func:`completion_seeds`) make each completion a function of its own seed. Subclass it
    (configs name a subclass with ``class_path``).

    An engine that keeps its own copy of the policy's weights overrides :meth:`weights_changed` (called after every
    optimizer step that changes the policy) and :meth:`release` (called when sampling is done, to free what it holds
    while training)."""

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
        num_samples: int = 1,
        seeds: torch.Tensor | None = None,
    ) -> Completions:
        raise NotImplementedError

    #: whether :class:`Completions` carry the engine's own log-probs
    returns_logps: bool = False
    #: whether the engine keeps its own copy of the weights (then a sharded policy need not be gathered to sample)
    owns_weights: bool = False
    #: the policy's tokenizer, given by the stage that uses the engine (:meth:`setup`)
    tokenizer: Any = None

    def setup(self, tokenizer: Any) -> None:
        """Called once by the :class:`~lit_align.rollout.RolloutStage` that samples with this engine."""
        self.tokenizer = tokenizer

    def weights_changed(self) -> None:
        """The policy's weights changed (an optimizer step): an engine with its own copy must refresh it."""

    def release(self) -> None:
        """Sampling is done for now: an engine may free what it holds (its KV cache) while the policy trains."""


class KeyedSampling(LogitsProcessor):
    """Sampling as a function of a seed per row: the Gumbel-max trick, ``argmax(logits / T + g)`` with ``g`` standard
    Gumbel noise drawn from a generator seeded by the row's seed and the decoding step, is an exact sample of
    ``softmax(logits / T)`` (restricted to the top-k and the top-p nucleus when asked). Run with greedy decoding
    (``do_sample=False``), after every other logits processor.

    Args:
        seeds: one int64 seed per row.
        start: the input length at the first decoding step (the padded prompt length).
        temperature, top_p, top_k: as in sampling (``top_k=0``: no limit).
    """

    def __init__(self, seeds: torch.Tensor, start: int, temperature: float, top_p: float, top_k: int = 0) -> None:
        self.seeds, self.start = [int(s) for s in seeds], start
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start
        logits = scores.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:  # the smallest set of top tokens whose probability reaches top_p, as HF's warper
            ordered, order = logits.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before the token already reaches top_p
            logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), -math.inf)
        generator = torch.Generator(device=scores.device)
        noise = torch.empty_like(logits)
        for row, seed in enumerate(self.seeds):
            generator.manual_seed((seed + step * 0x9E3779B97F4A7C15) % (1 << 63))
            noise[row] = torch.rand(logits.shape[-1], generator=generator, device=scores.device)
        tiny = torch.finfo(noise.dtype).tiny
        return logits - torch.log(-torch.log(noise.clamp(min=tiny, max=1 - 1e-7)))


class HFGenerator(Generator):
    """Sampling with Hugging Face ``generate`` and its KV cache, from left-padded prompts.

    With ``num_samples > 1`` (GRPO's group) each prompt is prefilled once and its KV cache repeated for its samples,
    instead of prefilling the same prompt ``num_samples`` times; where that does not fit the model (see
    :meth:`prompt_cache`) the prompt is repeated and prefilled as usual.

    Args:
        generate_kwargs: further arguments for ``generate`` (``min_new_tokens``, ``top_k``, ``repetition_penalty``,
            ...); they override the defaults here (pure sampling: ``top_k=0``).
        share_prompt_cache: prefill each prompt once for all its samples (see above).
    """

    def __init__(self, generate_kwargs: dict[str, Any] | None = None, share_prompt_cache: bool = True) -> None:
        refused = sorted(set(generate_kwargs or {}) & _CODE_LOADING_OPTIONS)
        if refused:
            raise ValueError(f"generate_kwargs {refused} would load and run code from a repository or directory; "
                             "lit_align does not pass them to generate")  # fmt: skip
        self.generate_kwargs = dict(generate_kwargs or {})
        self.share_prompt_cache = share_prompt_cache

    def __call__(self, model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_token_id,
                 pad_token_id, num_samples=1, seeds=None) -> Completions:  # fmt: skip
        lm = unwrap_model(model)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True)  # fmt: skip
        options.update(self.generate_kwargs)
        if seeds is not None and options["do_sample"]:  # keyed: greedy decoding of logits plus per-row noise
            unsupported = sorted(set(options) & _OTHER_WARPERS)
            if unsupported:
                raise ValueError(f"keyed sampling supports temperature, top_p and top_k, not {unsupported}")
            keyed = KeyedSampling(seeds, input_ids.shape[1], options.pop("temperature"), options.pop("top_p"),
                                  options.pop("top_k") or 0)  # fmt: skip
            options.update(do_sample=False, logits_processor=LogitsProcessorList([*options.get("logits_processor", []),
                                                                                  keyed]))  # fmt: skip
        if needs_synced_steps(lm):  # sharded, gathered layer by layer: every rank runs every decoding step (recent
            # transformers turns this on for FSDP-managed models by itself; said here, not left to detection)
            options["synced_gpus"] = True
        if num_samples > 1:
            cache = (
                self.prompt_cache(lm, input_ids, attention_mask, num_samples, **self.generate_kwargs)
                if self.share_prompt_cache
                else None
            )
            input_ids = input_ids.repeat_interleave(num_samples, 0)
            attention_mask = attention_mask.repeat_interleave(num_samples, 0)
            if cache is not None:
                options[_cache_argument(lm)] = cache
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        return Completions(out[:, input_ids.shape[1] :])

    @staticmethod
    @torch.no_grad()
    def prompt_cache(
        lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int, **generate_kwargs: Any
    ) -> Any:
        """The KV cache of every prompt but its last token (``generate`` feeds that one), each row repeated
        ``repeats`` times; ``None`` (prefill every repeated prompt instead) unless the model's cache is a plain
        dynamic key/value cache: a model or call that asks for another cache implementation, recurrent or
        linear-attention state (which repeating keys and values would not copy), or an empty prompt."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        config = getattr(lm, "generation_config", None)
        asked = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if input_ids.shape[1] < 2 or asked is not None:
            return None
        try:
            cache = DynamicCache(config=lm.config)
            mask = attention_mask[:, :-1]
            lm(input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=position_ids_from_mask(mask),
               use_cache=True, logits_to_keep=1, **{_cache_argument(lm): cache})  # fmt: skip
            if not cache.layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                                       for layer in cache.layers):  # fmt: skip
                return None
            cache.batch_repeat_interleave(repeats)
        except Exception as error:  # any model this path does not fit falls back to repeating the prompt
            rank_zero_warn(f"{type(lm).__name__}: prompts are prefilled once per sample ({error!r})")
            return None
        return cache


_CODE_LOADING_OPTIONS = {"custom_generate", "trust_remote_code"}  # generate() would import code they name
_OTHER_WARPERS = {"min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}  # sampling warpers KeyedSampling does not apply


def _cache_argument(lm: nn.Module) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before it."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
