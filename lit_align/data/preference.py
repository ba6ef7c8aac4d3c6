"""``PreferenceDataModule``: comparisons of responses to a prompt, for reward models and DPO.

Every example is a prompt with K >= 2 responses and the pairs ``(better, worse)`` among them: a chosen/rejected pair
is K = 2 with one pair; a ranking of K responses gives all C(K, 2) pairs (InstructGPT); scores give every pair whose
scores differ.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import RecordsDataModule
from lit_align.data.sources import DataError, DataSource, Record
from lit_align.data.tokenize import (
    Segment,
    SegmentEncoder,
    chat_segments,
    check_messages,
    check_prompt_messages,
    check_text,
    empty_response,
)
from lit_align.models import load_tokenizer
from lit_align.ops import pack_responses


@dataclass
class Comparison:
    """A prompt, its K responses and the ``(better, worse)`` index pairs among them.

    Attributes:
        prompt: the prompt's text segments.
        responses: each response's text as it follows the prompt (a chat row's: the rendered assistant turn, with
            the template's end-of-turn token), named by its field.
        contents: each response's own text (a chat row's: the turn's content), checked for emptiness.
        pairs: ``(better, worse)`` response indices.
        chat: the responses are chat turns, which end with the template's end-of-turn token (no EOS is added).
    """

    prompt: list[Segment]
    responses: list[Segment]
    contents: list[str]
    pairs: list[tuple[int, int]]
    chat: bool = False


def split_shared_prefix(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Split two full dialogues that share their beginning at the last ``marker`` (an assistant-turn header such as
    ``"\\n\\nAssistant:"``) inside the shared part: ``(prompt, chosen_response, rejected_response)``."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(marker, 0, shared)  # the last marker lying wholly inside the shared part
    if cut < 0:
        return "", chosen, rejected
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All C(K, 2) ``(better, worse)`` pairs of a ranking given best first as response indices."""
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def score_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """``(better, worse)`` pairs for every two responses whose scores differ (ties teach nothing)."""
    k = len(scores)
    return [(i, j) for i in range(k) for j in range(k) if scores[i] > scores[j]]


class PreferenceDataModule(RecordsDataModule):
    """Preference comparisons, tokenized with the prompt shared exactly by every response.

    Row shapes (detected per row):

    - explicit: ``{"prompt", "chosen", "rejected"}`` with strings, or with message lists (conversational: the
      prompt's turns, and the chosen/rejected assistant turns), rendered with the chat template;
    - implicit: ``{"chosen", "rejected"}`` full dialogues that share a prefix (Anthropic HH), split at the last
      shared ``assistant_marker``; or two message lists, split after their shared turns;
    - ranked: ``{"prompt", "responses": [...], "ranking": [best, ..., worst]}`` or ``"scores": [...]`` (higher is
      better): K responses give all C(K, 2) pairs (InstructGPT).

    Pairs whose responses are identical, or become identical or empty after truncation, are dropped and counted
    (they only teach ln 2); so are pairs with a response that is empty (``dropped_empty_response``) or that the
    tokenizer turns into nothing (``dropped_empty_after_tokenization``: characters its vocabulary lacks). Malformed
    rows raise a ``DataError`` naming file, row and field, or are skipped and counted with ``bad_rows="skip"``.

    Args:
        tokenizer: a tokenizer, or a name/path for :func:`~lit_align.models.load_tokenizer`; under ``lit-align`` it
            follows the model's.
        train_data: a local JSON/JSONL(.gz)/Parquet/CSV file, a list of them, a hub dataset id, a bundled sample
            (``"bundled:<file>"``) or a list of dicts.
        val_data: held-out comparisons in the same forms; if not given, ``val_fraction`` of the rows are held out.
            The held-out split serves validation and ``lit-align test`` (``test/...`` metrics) alike.
        val_fraction: fraction of training rows held out when ``val_data`` is not given.
        assistant_marker: the assistant-turn header at which implicit text pairs are split.
        max_length: longest prompt + response in tokens; longer ones are cut at the end.
        max_prompt_length: longest prompt in tokens; longer prompts keep their last tokens (after any BOS), so the
            response still follows the text it answers. ``None`` for no separate limit.
        bad_rows: ``"error"`` stops at the first malformed row; ``"skip"`` drops and counts them.
        share_prompt: forward each prompt once for all its responses (one packed row per comparison, see
            :class:`PreferenceCollator`) instead of once per response. Needs an attention implementation that takes
            a custom mask (``sdpa``, the default, or ``eager``).
        batch_size: prompts per batch on each device (each brings its K responses).
        num_workers: data-loader worker processes.
        seed: seed for the validation split.
        group_by_length: batch examples of similar length together (shuffled in chunks of 64 batches, each chunk
            sorted by length), so that less of each batch is padding; the order is still fixed by ``seed`` and the
            epoch, and resumes exactly.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "tiny",
        train_data: DataSource | list[str] = "bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz",
        val_data: DataSource | list[str] | None = None,
        val_fraction: float = 0.1,
        assistant_marker: str = "\n\nAssistant:",
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        bad_rows: Literal["error", "skip"] = "error",
        share_prompt: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.train_data, self.val_data, self.val_fraction = train_data, val_data, val_fraction
        self.assistant_marker = assistant_marker
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.bad_rows = bad_rows
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.group_by_length = group_by_length
        self.encoder = SegmentEncoder(self.tokenizer)
        self.share_prompt = share_prompt
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, share_prompt=share_prompt)

    # ----- parsing ----------------------------------------------------------------------------------------------
    def parse(self, record: Record) -> Comparison:
        """The comparison in ``record``, or a ``DataError`` naming what is wrong with it."""
        row, where = record.row, record.where
        if not isinstance(row, Mapping):
            raise DataError(where, None, f"must be an object with named fields, got {type(row).__name__}")
        if "prompt" in row and row["prompt"] is None:  # a missing prompt, not an implicit-prompt row
            raise DataError(
                where, "prompt", "is missing (None); leave the field out if the prompt is the dialogues' shared start"
            )
        if "responses" in row:
            return self._ranked(row, where)
        for name in ("chosen", "rejected"):
            if name not in row:
                raise DataError(
                    where, name, "is missing (expected prompt/chosen/rejected, chosen/rejected or responses)"
                )
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
            return self._conversational(prompt, chosen, rejected, where)
        chosen = check_text(chosen, where, "chosen")
        rejected = check_text(rejected, where, "rejected")
        prompt_field = "prompt"
        if prompt is None:
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected, self.assistant_marker)
            prompt_field = "chosen"
            if not prompt:
                raise DataError(
                    where, "chosen", f"shares no {self.assistant_marker!r} turn with 'rejected' to split at"
                )
        else:
            prompt = check_text(prompt, where, "prompt")
        responses = [Segment(chosen, True, "chosen"), Segment(rejected, True, "rejected")]
        return Comparison([Segment(prompt, False, prompt_field)], responses, [chosen, rejected], [(0, 1)])

    def _ranked(self, row: Mapping[str, Any], where: str) -> Comparison:
        prompt = check_text(row.get("prompt"), where, "prompt")
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(where, "responses", "must be a list of at least two responses")
        responses = [check_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        k = len(responses)
        if "ranking" in row:
            ranking = row["ranking"]
            if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
                raise DataError(where, "ranking", f"must list each of the {k} response indices once, best first")
            pairs = ranking_pairs(ranking)
        elif "scores" in row:
            scores = row["scores"]
            if not isinstance(scores, list) or len(scores) != k or not all(isinstance(s, (int, float)) for s in scores):
                raise DataError(where, "scores", f"must be a list of {k} numbers, one per response")
            pairs = score_pairs(scores)
        else:
            raise DataError(where, "ranking", "is missing: ranked rows need 'ranking' (best first) or 'scores'")
        segments = [Segment(text, True, f"responses[{i}]") for i, text in enumerate(responses)]
        return Comparison([Segment(prompt, False, "prompt")], segments, responses, pairs)

    def _conversational(self, prompt: Any, chosen: Any, rejected: Any, where: str) -> Comparison:
        if prompt is None:  # implicit: the shared leading turns are the prompt
            chosen = check_messages(chosen, where, "chosen")
            rejected = check_messages(rejected, where, "rejected")
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        else:
            prompt = check_prompt_messages(prompt, where, "prompt")
        turns = []
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(reply, str):
                reply = [{"role": "assistant", "content": reply}]
            if not isinstance(reply, list) or len(reply) != 1:
                raise DataError(where, name, "must be one assistant turn (a string or a one-message list)")
            turns.append(check_messages([*prompt, *reply], where, name)[-1])
        rendered = [chat_segments(self.tokenizer, [*prompt, turn], where) for turn in turns]
        prompt_text = "".join(segment.text for segment in rendered[0][:-1])
        responses = []
        for name, segments in zip(("chosen", "rejected"), rendered):
            if "".join(segment.text for segment in segments[:-1]) != prompt_text or not segments[-1].trainable:
                raise DataError(where, name, "the chat template renders the shared prompt differently per response")
            responses.append(Segment(segments[-1].text, True, name))
        contents = [turn["content"] for turn in turns]
        return Comparison([Segment(prompt_text, False, "prompt")], responses, contents, [(0, 1)], chat=True)

    # ----- tokenizing -------------------------------------------------------------------------------------------
    def neutral_example(self, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "pairs": []}

    def encode_record(self, record: Record, index: int, counts: Counter) -> list[dict[str, Any]]:
        example = self.encode(self.parse(record), counts, record.where)
        if example is None:
            return []
        counts["pairs"] += len(example["pairs"])
        return [example]

    def encode(self, comparison: Comparison, counts: Counter, where: str = "input") -> dict[str, Any] | None:
        """``{"prompt_ids", "response_ids": [K lists], "pairs"}``; ``None`` (counted) if no usable pair is left.
        Each response is tokenized as it follows the prompt (see :class:`~lit_align.data.tokenize.SegmentEncoder`),
        so ``prompt_ids + response_ids[k]`` is exactly the sequence that a single prompt/response pair would give."""
        prompt_ids, response_ids, empty = self.encode_responses(comparison, counts, where)
        pairs = []
        for better, worse in comparison.pairs:
            if comparison.contents[better] == comparison.contents[worse]:
                counts["dropped_identical"] += 1
            elif empty[better] or empty[worse]:
                counts[empty[better] or empty[worse]] += 1
            elif not response_ids[better] or not response_ids[worse]:
                counts["dropped_empty_after_truncation"] += 1
            elif response_ids[better] == response_ids[worse]:
                counts["dropped_identical_after_truncation"] += 1
            else:
                pairs.append((better, worse))
        if not pairs:
            return None
        return {"prompt_ids": prompt_ids, "response_ids": response_ids, "pairs": pairs}

    def encode_responses(
        self, comparison: Comparison, counts: Counter, where: str = "input"
    ) -> tuple[list[int], list[list[int]], list[str | None]]:
        """``(prompt_ids, response_ids, empty)``: the prompt's tokens (``max_prompt_length`` applied), each response's
        tokens as it follows the prompt, cut to ``max_length`` (counted), and why each response is empty (a count
        name, see :func:`~lit_align.data.tokenize.empty_response`; its ids are then ``[]``) or ``None``."""
        prompt_ids = self.encoder.encode(comparison.prompt, add_eos=False, where=where).input_ids
        empty = [empty_response(self.tokenizer, content) for content in comparison.contents]
        response_ids = []
        for response, reason in zip(comparison.responses, empty):
            if reason:
                response_ids.append([])
                continue
            ids = self.encoder.encode([*comparison.prompt, response], not comparison.chat, where).input_ids
            response_ids.append(ids[len(prompt_ids) :])
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            keep = len(self.encoder.prefix)
            prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - (self.max_prompt_length - keep) :]
            counts["prompt_truncated"] += 1
        budget = self.max_length - len(prompt_ids)
        for k, ids in enumerate(response_ids):
            if len(ids) > budget:
                counts["truncated"] += 1
                response_ids[k] = ids[: max(budget, 0)]
        return prompt_ids, response_ids, empty


@dataclass
class PreferenceCollator:
    """Batches comparisons so that each response is forwarded once, with the prompt forwarded once per response or,
    with ``share_prompt``, once per comparison.

    - ``share_prompt=False``: one row per response, ``prompt + response``, padded; ``attention_mask`` [N, T] and
      ``labels`` (response tokens only).
    - ``share_prompt=True``: one row per comparison, ``prompt + response_1 + ... + response_K``; ``segment_ids``
      (0 prompt, k for response k, -1 padding) says which tokens may see which: a response attends to the prompt
      and to its own earlier tokens, never to another response. Each response's positions continue from the end of
      the prompt, so every response sees exactly what it would see alone. On Anthropic HH, where the prompt is most
      of the tokens, this removes about a third of the work.

    Both layouts give ``input_ids``, ``attention_mask`` and ``position_ids`` ``[rows, T]``, and the same flat index of
    the M scored response tokens: ``target_row``, ``target_col`` (the position whose logits predict the token: the
    previous token of the response, or the prompt's last token for a response's first token), ``target_id`` and
    ``target_response`` (which of the N responses, ``0..N-1`` in example order), all ``[M]``; per response
    ``response_row`` and ``response_end`` (its last token, where a reward model reads its score) and
    ``response_lengths`` (scored tokens), all ``[N]``; per pair ``better``, ``worse`` (response indices) and
    ``group`` (the comparison), all ``[P]``; and ``ref_logps`` ``[N]`` when every example carries precomputed
    reference log-probs.

    Args:
        pad_token_id: id written at pad positions.
        padding_side: ``"right"`` or ``"left"``.
        share_prompt: pack each comparison's prompt and responses into one row (see above).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    share_prompt: bool = False

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pack_responses([(e["prompt_ids"], e["response_ids"]) for e in examples], self.pad_token_id,
                               self.share_prompt, self.padding_side)  # fmt: skip
        better, worse, group, n = [], [], [], 0
        for g, example in enumerate(examples):
            for b, w in example["pairs"]:
                better.append(n + b)
                worse.append(n + w)
                group.append(g)
            n += len(example["response_ids"])
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        batch.update(better=as_long(better), worse=as_long(worse), group=as_long(group))
        if examples and all("ref_logps" in e for e in examples):
            batch["ref_logps"] = torch.tensor([v for e in examples for v in e["ref_logps"]], dtype=torch.float32)
        return batch
