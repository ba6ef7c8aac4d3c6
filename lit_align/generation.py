"""Sampling for the on-policy methods (PPO, GRPO): a small ``Generator`` interface and its Hugging Face
implementation."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_align.data.collate import position_ids_from_mask
from lit_align.modules.base import unwrap_model


class Generator:
    """Samples completions: a small interface so that a faster engine (vLLM, ...) can replace Hugging Face
    ``generate`` without touching the maths. From ``[B, P]`` left-padded prompts it returns ``[B * num_samples, R]``
    completion ids, the ``num_samples`` completions of a prompt consecutive; after a row's first EOS anything may
    follow (it is masked). Subclass it (configs name a subclass with ``class_path``)."""

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
    ) -> torch.Tensor:
        raise NotImplementedError


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
        self.generate_kwargs = dict(generate_kwargs or {})
        self.share_prompt_cache = share_prompt_cache

    def __call__(self, model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_token_id,
                 pad_token_id, num_samples=1) -> torch.Tensor:  # fmt: skip
        lm = unwrap_model(model)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True)  # fmt: skip
        options.update(self.generate_kwargs)
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
        return out[:, input_ids.shape[1] :]

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


def _cache_argument(lm: nn.Module) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before it."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, R]`` 1 on response tokens up to and including the first EOS (all tokens when there is none)."""
    is_eos = (response_ids == eos_token_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()
