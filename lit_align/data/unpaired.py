"""``UnpairedDataModule``: completions labelled desirable or undesirable, for KTO (Ethayarajh et al. 2024).

Every example is a prompt with K >= 1 labelled completions, and, for each completion, a mismatched *KL completion*:
a completion of another prompt, placed after this prompt, on which KTO estimates its reference point
``KL(pi || pi_ref)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lit_align.data.preference import Comparison, PreferenceDataModule
from lit_align.data.sources import DataError, DataSource, Record
from lit_align.data.tokenize import Segment, chat_segments, check_messages, check_prompt_messages, check_text
from lit_align.ops import pack_responses


class UnpairedDataModule(PreferenceDataModule):
    """Unpaired preference data: each completion labelled desirable (``true``) or undesirable (``false``), tokenized
    with the prompt shared exactly, as :class:`~lit_align.data.PreferenceDataModule` tokenizes (same sources, same
    guarantees, same counts).

    Row shapes (detected per row):

    - unpaired: ``{"prompt", "completion", "label": bool}``, with strings, or with a message list as the prompt (its
      turns, ending with the user's) and the completion as one assistant turn (a string or a one-message list),
      rendered with the chat template;
    - paired, with ``unpair: true`` (the default): any chosen/rejected row that ``PreferenceDataModule`` reads
      (explicit, or implicit dialogues such as Anthropic HH, text or messages) becomes two completions of its
      prompt, ``chosen`` labelled true and ``rejected`` false (TRL's ``unpair_preference_dataset``). Both stay in
      one example, so that the prompt is forwarded once for both; the loss treats them as independent completions.
      Held-out pairs also give the implicit-reward accuracy (``better``/``worse`` in the batch).

    A ``label`` that is not a boolean (``1``, ``"true"``, ``null``) is a ``DataError`` naming file, row and field;
    so is a paired row with ``unpair: false``. Empty completions, or completions emptied by truncation, are dropped
    and counted; a paired row whose chosen and rejected are identical (or become so) is dropped and counted.

    **KL completions.** Each example's KL completions are fixed when the data is set up, as TRL's text path fixes
    ``KL_completion_ids`` before training: in each split's order, example ``i`` takes the completions of the nearest
    earlier example (cyclically: ``i - 1``, ``i - 2``, ...) whose prompt differs (so an HH pair's two halves, or a
    repeated prompt, never pair with themselves), completion ``k`` that example's ``k mod K``, cut to fit
    ``max_length`` after this prompt. TRL rotates the completions by one (prompt ``i`` with completion ``i - 1``)
    within each chunk of ``per_device_train_batch_size`` rows of the dataset; rotating over the whole split instead
    makes the pairs independent of the batch size and of the number of ranks (N ranks train as one device with N
    times the batch), and fixed per example, so the reference's log-probs on them can be precomputed and cached.
    When every example of a split has the same prompt there is no mismatched completion (counted,
    ``kl_same_prompt``).

    Args:
        tokenizer: a tokenizer, or a name/path for :func:`~lit_align.models.load_tokenizer`; under ``lit-align`` it
            follows the model's.
        train_data: a local JSON/JSONL(.gz)/Parquet/CSV file, a list of them, a hub dataset id, a bundled sample
            (``"bundled:<file>"``) or a list of dicts.
        val_data: held-out rows in the same forms; if not given, ``val_fraction`` of the rows are held out.
            The held-out split serves validation and ``lit-align test`` (``test/...`` metrics) alike.
        val_fraction: fraction of training rows held out when ``val_data`` is not given.
        unpair: turn chosen/rejected rows into a desirable and an undesirable completion of their prompt; ``false``
            accepts unpaired rows only.
        assistant_marker: the assistant-turn header at which implicit text pairs are split.
        max_length: longest prompt + completion in tokens; longer ones are cut at the end.
        max_prompt_length: longest prompt in tokens; longer prompts keep their last tokens (after any BOS).
        bad_rows: ``"error"`` stops at the first malformed row; ``"skip"`` drops and counts them.
        share_prompt: forward each prompt once for its completions and KL completions (one packed row per example,
            see :class:`UnpairedCollator`). Needs an attention implementation that takes a custom mask (``sdpa``,
            the default, or ``eager``).
        batch_size: prompts per batch on each device (each brings its completions: two for an unpaired pair).
        num_workers: data-loader worker processes.
        seed: seed for the validation split.
        group_by_length: batch examples of similar length together (see ``PreferenceDataModule``).
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "tiny",
        train_data: DataSource | list[str] = "bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz",
        val_data: DataSource | list[str] | None = None,
        val_fraction: float = 0.1,
        unpair: bool = True,
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
        super().__init__(
            tokenizer, train_data, val_data, val_fraction, assistant_marker, max_length, max_prompt_length, bad_rows,
            share_prompt, batch_size, num_workers, seed, group_by_length,
        )  # fmt: skip
        self.unpair = unpair
        self.collator = UnpairedCollator(self.tokenizer.pad_token_id, share_prompt=share_prompt)

    # ----- parsing ----------------------------------------------------------------------------------------------
    def parse_labelled(self, record: Record) -> tuple[Comparison, list[bool]]:
        """The prompt, its completions and their labels in ``record``, or a ``DataError`` naming what is wrong."""
        row, where = record.row, record.where
        if not isinstance(row, Mapping):
            raise DataError(where, None, f"must be an object with named fields, got {type(row).__name__}")
        if "label" not in row:
            if not self.unpair:
                raise DataError(where, "label", "is missing (unpaired rows are {prompt, completion, label}; set "
                                "unpair: true to use chosen/rejected pairs)")  # fmt: skip
            if "responses" in row:
                raise DataError(where, "responses", "ranked rows have no desirable/undesirable split; give "
                                "chosen/rejected pairs or labelled completions")  # fmt: skip
            if "chosen" not in row and "completion" in row:
                raise DataError(where, "label", "is missing: a completion needs its label (true: desirable)")
            comparison = self.parse(record)
            return comparison, [True, False]
        label = row["label"]
        if not isinstance(label, bool):
            raise DataError(where, "label", f"must be a boolean (true: desirable), got {type(label).__name__} "
                            f"{label!r}")  # fmt: skip
        prompt, completion = row.get("prompt"), row.get("completion")
        if "completion" not in row:
            raise DataError(where, "completion", "is missing (unpaired rows are {prompt, completion, label})")
        if isinstance(prompt, list) or isinstance(completion, list):
            return self._conversational_completion(prompt, completion, where), [label]
        prompt = check_text(prompt, where, "prompt")
        completion = check_text(completion, where, "completion")
        comparison = Comparison([Segment(prompt, False, "prompt")], [Segment(completion, True, "completion")],
                                [completion], [])  # fmt: skip
        return comparison, [label]

    def _conversational_completion(self, prompt: Any, completion: Any, where: str) -> Comparison:
        prompt = check_prompt_messages(prompt, where, "prompt")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if not isinstance(completion, list) or len(completion) != 1:
            raise DataError(where, "completion", "must be one assistant turn (a string or a one-message list)")
        turn = check_messages([*prompt, *completion], where, "completion")[-1]
        segments = chat_segments(self.tokenizer, [*prompt, turn], where)
        prompt_text = "".join(segment.text for segment in segments[:-1])
        response = Segment(segments[-1].text, True, "completion")
        return Comparison([Segment(prompt_text, False, "prompt")], [response], [turn["content"]], [], chat=True)

    # ----- tokenizing -------------------------------------------------------------------------------------------
    def neutral_example(self, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "pairs": [], "padding": True}

    def encode_record(self, record: Record, index: int, counts: Counter) -> list[dict[str, Any]]:
        comparison, labels = self.parse_labelled(record)
        example = self.encode_labelled(comparison, labels, counts, record.where)
        if example is None:
            return []
        counts["desirable"] += sum(example["labels"])
        counts["undesirable"] += len(example["labels"]) - sum(example["labels"])
        return [example]

    def encode_labelled(
        self, comparison: Comparison, labels: Sequence[bool], counts: Counter, where: str = "input"
    ) -> dict[str, Any] | None:
        """``{"prompt_ids", "completion_ids": [K lists], "labels": [K], "pairs"}`` (``pairs``: ``(chosen, rejected)``
        indices of a pair whose halves both survived); ``None`` (counted) if no completion is left."""
        prompt_ids, response_ids, empty = self.encode_responses(comparison, counts, where)
        keep = []
        for k, (ids, reason) in enumerate(zip(response_ids, empty)):
            if reason:
                counts[reason] += 1
            elif not ids:
                counts["dropped_empty_after_truncation"] += 1
            else:
                keep.append(k)
        if len(comparison.responses) == 2 and len(keep) == 2:
            if comparison.contents[0] == comparison.contents[1]:
                counts["dropped_identical"] += 1
                keep = []
            elif response_ids[0] == response_ids[1]:
                counts["dropped_identical_after_truncation"] += 1
                keep = []
        if not keep:
            return None
        pairs = [(0, 1)] if len(comparison.responses) == 2 and len(keep) == 2 else []
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [response_ids[k] for k in keep],
            "labels": [bool(labels[k]) for k in keep],
            "pairs": pairs,
        }

    def encode_records(self, records: Sequence[Record], split: str) -> list[dict[str, Any]]:
        examples = super().encode_records(records, split)
        attach_kl_completions(examples, self.max_length, self.stats[split])
        return examples


def attach_kl_completions(examples: list[dict[str, Any]], max_length: int, counts: Counter | None = None) -> None:
    """Set each example's ``response_ids`` to its K completions followed by its K KL completions (see
    :class:`UnpairedDataModule`): the completions of the nearest earlier example, cyclically, whose prompt differs,
    cut to fit ``max_length`` after this example's prompt."""
    n = len(examples)
    keys = [tuple(e["prompt_ids"]) for e in examples]
    # one pass twice around the cycle: the nearest earlier example whose prompt differs is the one just before the
    # run of equal prompts that ends at i (linear, however many rows share a prompt)
    nearest: list[int | None] = [None] * n
    last = None
    for j in range(1, 2 * n):
        i, previous = j % n, (j - 1) % n
        if keys[previous] != keys[i]:
            last = previous
        if j >= n:
            nearest[i] = last
    for i, example in enumerate(examples):
        prompt = example["prompt_ids"]
        source = None if nearest[i] is None else examples[nearest[i]]
        if source is None:  # one prompt in the whole split: no mismatched completion exists
            source = examples[(i - 1) % n]
            if counts is not None:
                counts["kl_same_prompt"] += 1
        budget = max(max_length - len(prompt), 1)
        others = source["completion_ids"]
        kl = [others[k % len(others)][:budget] for k in range(len(example["completion_ids"]))]
        example["response_ids"] = [*example["completion_ids"], *kl]


@dataclass
class UnpairedCollator:
    """Batches labelled completions with their KL completions so that each is forwarded once, with the prompt
    forwarded once per sequence or, with ``share_prompt``, once per example (``prompt + completions + KL
    completions`` in one row with a block attention mask, as :class:`~lit_align.data.PreferenceCollator` packs).

    Example ``e``'s ``response_ids`` are its K completions, then its K KL completions (the same prompt followed by
    another prompt's completions, see :class:`UnpairedDataModule`); they become responses ``0..N-1`` of the batch
    in order, with the layout keys of :func:`~lit_align.ops.pack_responses` (``input_ids``, ``attention_mask``,
    ``position_ids``, ``target_*``, ``response_*``; ``segment_ids`` when packed). Per completion, all ``[C]``:
    ``completion`` and ``kl`` (the response indices of the completion and of its KL completion), ``label`` (true:
    desirable) and ``real`` (false for the copies that even out the ranks' held-out sets, which count in nothing).
    Per held-out pair, ``[P]``: ``better``, ``worse`` (completion indices, ``0..C-1``). ``ref_logps`` ``[N]`` when
    every example carries precomputed reference log-probs.

    Args:
        pad_token_id: id written at pad positions.
        padding_side: ``"right"`` or ``"left"``.
        share_prompt: pack each example's prompt and responses into one row (see above).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    share_prompt: bool = False

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        for example in examples:
            if "response_ids" not in example:
                raise ValueError("an unpaired example needs its KL completions: use UnpairedDataModule's datasets, or "
                                 "lit_align.data.unpaired.attach_kl_completions")  # fmt: skip
        batch = pack_responses([(e["prompt_ids"], e["response_ids"]) for e in examples], self.pad_token_id,
                               self.share_prompt, self.padding_side)  # fmt: skip
        completion, kl, label, real, better, worse = [], [], [], [], [], []
        n = 0
        for example in examples:
            k = len(example["labels"])
            if len(example["response_ids"]) != 2 * k:
                raise ValueError(f"an unpaired example has {k} labels but {len(example['response_ids'])} responses; "
                                 "expected its completions then as many KL completions")  # fmt: skip
            c = len(completion)
            better += [c + b for b, _ in example["pairs"]]
            worse += [c + w for _, w in example["pairs"]]
            completion += range(n, n + k)
            kl += range(n + k, n + 2 * k)
            label += example["labels"]
            real += [not example.get("padding", False)] * k
            n += 2 * k
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        as_bool = lambda values: torch.tensor(values, dtype=torch.bool)  # noqa: E731
        batch.update(completion=as_long(completion), kl=as_long(kl), better=as_long(better), worse=as_long(worse),
                     label=as_bool(label), real=as_bool(real))  # fmt: skip
        if examples and all("ref_logps" in e for e in examples):
            batch["ref_logps"] = torch.tensor([v for e in examples for v in e["ref_logps"]], dtype=torch.float32)
        return batch
