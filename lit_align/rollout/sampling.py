"""Sampling primitives shared by every method's ``predict_step``, the ``lit-align generate`` command and the
recipe's evaluation: greedy or keyed sampling from already tokenized prompts (:func:`generate_ids`), the tokens that
end a completion (:func:`stop_token_ids`), and a batch's prompts as token lists and text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.data.tokenize import render_chat, special_prefix
from lit_align.forward import eval_mode
from lit_align.ops import IGNORE_INDEX, pad_sequences
from lit_align.rollout.generators import HFGenerator, completion_seeds

__all__ = ["batch_prompt_ids", "decode_prompt", "generate_ids", "stop_token_ids"]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a completion: EOS, and the chat template's end-of-turn token where it has one that is not EOS
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``): the special token the template writes right after an
    assistant turn's content."""
    stops = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        marker = "lit-align-end-of-content"
        try:
            text = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                               generation_prompt=False)  # fmt: skip
        except Exception:  # a template that refuses this minimal chat (a required system turn, ...): EOS only
            text = ""
        after = text[text.find(marker) + len(marker) :] if marker in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if ids and ids[0] in specials and ids[0] not in stops:
            stops.append(ids[0])
    return stops


def generate_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 16,
    stream: Sequence[Any] = (0, "generate"),
    keys: Sequence[int] | None = None,
    keep_stop: bool = False,
) -> list[list[list[int]]]:
    """Completion token ids, ``num_samples`` per prompt, each cut before its first stop token
    (:func:`stop_token_ids`; ``keep_stop``: after it, as the sequence whose probability the policy gave), from
    already tokenized prompts, left-padded in batches of ``batch_size`` prompts.

    ``temperature == 0`` decodes greedily (the ``num_samples`` completions of a prompt are then one completion,
    repeated); otherwise completion ``k`` of prompt ``i`` is sampled (temperature, nucleus ``top_p``) from the seed
    :func:`~lit_align.rollout.completion_seeds` gives ``(*stream, keys[i], k)`` (``keys`` default: the prompts'
    indices), so it does not depend on ``batch_size`` or on the other prompts."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}, num_samples={num_samples}, "
            f"batch_size={batch_size}: need max_new_tokens, num_samples, batch_size >= 1, temperature >= 0 and top_p "
            "in (0, 1]"
        )
    keys = list(range(len(prompt_ids))) if keys is None else [int(k) for k in keys]
    if any(not ids for ids in prompt_ids):
        raise ValueError("an empty prompt (no tokens) cannot be continued")
    greedy = temperature == 0
    generator = (
        HFGenerator({"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        if greedy
        else HFGenerator()
    )
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device
    drawn = 1 if greedy else num_samples
    out: list[list[list[int]]] = []
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(ids) for ids in prompt_ids[start : start + batch_size]]
            input_ids = pad_sequences(chunk, pad, "left").to(device)
            mask = pad_sequences([[1] * len(ids) for ids in chunk], 0, "left").to(device)
            seeds = None if greedy else completion_seeds(*stream, keys=keys[start : start + len(chunk)],
                                                          num_samples=drawn).to(device)  # fmt: skip
            completions = generator(
                model, input_ids, mask, max_new_tokens=max_new_tokens, temperature=temperature or 1.0, top_p=top_p,
                eos_token_id=stops, pad_token_id=pad, num_samples=drawn, seeds=seeds,
            ).ids.tolist()  # fmt: skip
            for row in range(len(chunk)):
                samples = [_until_stop(c, stops, keep_stop) for c in completions[row * drawn : (row + 1) * drawn]]
                out.append(samples * num_samples if greedy else samples)
    return out


def _until_stop(ids: list[int], stops: Sequence[int], keep: bool = False) -> list[int]:
    end = next((i + keep for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


def batch_prompt_ids(batch: Mapping[str, Any]) -> list[list[int]]:
    """The prompts of a batch as token lists: its ``prompt_ids`` (a DataModule's predict loader puts them there),
    else the tokens before the first labelled one of an SFT batch (``labels``), else the real tokens of a
    left-padded prompt batch (``input_ids``, ``attention_mask``)."""
    if "prompt_ids" in batch:
        return [list(ids) for ids in batch["prompt_ids"]]
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].bool().tolist()
    if "labels" in batch:
        prompts = []
        for row, real, labels in zip(ids, mask, batch["labels"].tolist()):
            start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            prompts.append([t for t, keep in zip(row[:start], real[:start]) if keep])
        return prompts
    return [[t for t, keep in zip(row, real) if keep] for row, real in zip(ids, mask)]


def decode_prompt(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """A prompt's text from its tokens: without the BOS the tokenizer puts first, but with the special tokens a chat
    template writes (role markers), so that the text reads as it was rendered."""
    prefix = special_prefix(tokenizer)
    ids = list(ids)
    if prefix and ids[: len(prefix)] == prefix:
        ids = ids[len(prefix) :]
    return tokenizer.decode(ids, skip_special_tokens=False)
