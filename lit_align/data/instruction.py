"""``InstructionDataModule``: instruction data (Alpaca, Self-Instruct, prompt/completion, chat, FLAN templates)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from lit_align.data.base import RecordsDataModule
from lit_align.data.collate import SFTCollator
from lit_align.data.sources import DataError, DataSource, Record
from lit_align.data.templates import alpaca_prompt, load_templates
from lit_align.data.tokenize import (
    IGNORE_INDEX,
    Segment,
    SegmentEncoder,
    chat_segments,
    check_messages,
    check_text,
    empty_response,
)
from lit_align.models import load_tokenizer


@dataclass
class Example:
    """An example before tokenizing.

    Attributes:
        segments: its text, in pieces; ``trainable`` marks the responses (a completion, each assistant turn).
        add_eos: whether EOS must be appended (not for chat templates, which end assistant turns with their own
            end-of-turn token).
        empty: the responses that are left out of the loss, as segment index -> the count name saying why
            (``dropped_empty_response``, ``dropped_empty_after_tokenization``).
    """

    segments: list[Segment]
    add_eos: bool
    empty: dict[int, str] = field(default_factory=dict)

    def prompt(self) -> str:
        """The text before the first response."""
        first = next((k for k, segment in enumerate(self.segments) if segment.trainable), len(self.segments))
        return "".join(segment.text for segment in self.segments[:first])


class InstructionDataModule(RecordsDataModule):
    """Instruction-tuning data, tokenized with the loss on the response only.

    Each row is one of these shapes (detected per row):

    - ``{"messages": [{"role", "content"}, ...]}``: a chat, rendered with the tokenizer's chat template; the loss is
      taken on every assistant turn.
    - ``{"prompt", "completion"}``.
    - ``{"instruction", "input"?, "output"}`` (Alpaca), or ``{"instruction", "instances": [{"input", "output"}]}``
      (Self-Instruct seed tasks: one example per instance). Rendered in the Alpaca prompt format.
    - any fields, rendered through FLAN-style ``templates`` (see :mod:`lit_align.data.templates`).

    A response that is empty, or that the tokenizer turns into nothing (characters its vocabulary lacks), is left out
    of the loss and counted per response (``dropped_empty_response``, ``dropped_empty_after_tokenization``): an empty
    assistant turn of a chat is not labelled while the chat's other turns train, and an example with no response left
    is dropped. Examples whose response is cut away by truncation are dropped and counted too.
    Malformed rows raise a :class:`~lit_align.data.sources.DataError` naming the file, row and field, or are skipped
    and counted with ``bad_rows="skip"``. The counts are logged when the data is set up and kept in ``self.stats``.

    Args:
        tokenizer: a tokenizer, or a name/path for :func:`~lit_align.models.load_tokenizer`. Under ``lit-align`` it
            follows the model's.
        train_data: a local JSON/JSONL(.gz)/Parquet/CSV file, a list of such files, a hub dataset id
            (``"name"`` or ``"name:split"``), or a list of dicts.
        val_data: held-out data in the same forms; if not given, ``val_fraction`` of the training rows are held out.
            The held-out split serves validation and ``lit-align test`` (``test/...`` metrics) alike.
        val_fraction: fraction of training rows held out for validation when ``val_data`` is not given (0 for none).
        templates: FLAN-style templates: a YAML/JSON path or a dict; every row is rendered through them.
        options_marker: text that introduces a classification task's answer options (FLAN's ``"OPTIONS:"``).
        every_template: render each row through every template of its task instead of one picked per row.
        use_chat_template: wrap non-chat rows as a user turn and an assistant turn of the tokenizer's chat template.
        train_on_prompt: take the loss on prompt tokens too, not only on the response.
        max_length: longest sequence in tokens; longer ones are cut at the end.
        end_markers: literal end-of-text strings a dataset writes at the end of responses (the T0/P3 files end with
            ``"<|endoftext|>"``); they are removed and the tokenizer's own EOS is used.
        bad_rows: ``"error"`` stops at the first malformed row; ``"skip"`` drops such rows and counts them.
        batch_size: examples per batch on each device.
        num_workers: data-loader worker processes.
        seed: seed for the validation split and for picking templates.
        group_by_length: batch examples of similar length together (shuffled in chunks of 64 batches, each chunk
            sorted by length), so that less of each batch is padding; the order is still fixed by ``seed`` and the
            epoch, and resumes exactly.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "tiny",
        train_data: DataSource | list[str] = "bundled:self_instruct_seed_tasks.jsonl",
        val_data: DataSource | list[str] | None = None,
        val_fraction: float = 0.05,
        templates: str | dict[str, Any] | None = None,
        options_marker: str = "OPTIONS:",
        every_template: bool = False,
        use_chat_template: bool = False,
        train_on_prompt: bool = False,
        max_length: int = 2048,
        end_markers: list[str] | None = None,
        bad_rows: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.train_data, self.val_data, self.val_fraction = train_data, val_data, val_fraction
        self.templates = load_templates(templates, options_marker, seed) if templates is not None else None
        self.every_template = every_template
        self.use_chat_template = use_chat_template
        self.train_on_prompt = train_on_prompt
        self.max_length = max_length
        self.end_markers = list(end_markers or [])
        self.bad_rows = bad_rows
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.group_by_length = group_by_length
        self.collator = SFTCollator(self.tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        self.encoder = SegmentEncoder(self.tokenizer, max_length)

    def neutral_example(self, example: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": example["input_ids"], "labels": [IGNORE_INDEX] * len(example["labels"])}

    def encode_record(self, record: Record, index: int, counts: Counter) -> list[dict[str, list[int]]]:
        """The tokenized examples of one row (a Self-Instruct row can hold several), counting what is dropped."""
        examples = []
        for example in self.record_examples(record, index):
            counts.update(example.empty.values())
            if len(example.empty) == sum(segment.trainable for segment in example.segments):
                continue  # no response left to learn from
            segments = [
                Segment(text, k not in example.empty if trainable else self.train_on_prompt, name)
                for k, (text, trainable, name) in enumerate(example.segments)
            ]
            encoded = self.encoder.encode(segments, example.add_eos, record.where)
            counts["truncated"] += encoded.truncated
            if all(label == IGNORE_INDEX for label in encoded.labels):
                counts["dropped_empty_after_truncation"] += 1
                continue
            examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        return examples

    def record_examples(self, record: Record, index: int) -> list[Example]:
        """The examples in ``record``, their empty responses marked."""
        row, where = record.row, record.where
        if not isinstance(row, Mapping):
            raise DataError(where, None, f"must be an object with named fields, got {type(row).__name__}")
        if self.templates is not None:
            pairs = self.templates.render(row, index, where, self.every_template)
            return [self._pair_example(prompt, completion, where, None, None) for prompt, completion in pairs]
        if "messages" in row:
            messages = check_messages(row["messages"], where)
            return [self._chat_example(messages, where)]
        if "prompt" in row or "completion" in row:
            prompt = check_text(row.get("prompt"), where, "prompt")
            completion = check_text(row.get("completion"), where, "completion")
            return [self._pair_example(prompt, completion, where, "prompt", "completion")]
        if "instruction" in row:
            return self._instruction_examples(row, where)
        raise DataError(
            where,
            None,
            f"has fields {sorted(row)}; expected 'messages', 'prompt'/'completion', or "
            "'instruction'/'output' (or pass templates)",
        )

    def _instruction_examples(self, row: Mapping[str, Any], where: str) -> list[Example]:
        instruction = check_text(row.get("instruction"), where, "instruction")
        if "instances" in row:
            instances = row["instances"]
            if not isinstance(instances, list) or not instances:
                raise DataError(where, "instances", "must be a non-empty list of {'input', 'output'}")
            items = [(inst, f"instances[{i}].") for i, inst in enumerate(instances)]
        else:
            items = [(row, "")]
        examples = []
        for item, prefix in items:
            if not isinstance(item, Mapping):
                raise DataError(where, prefix.rstrip("."), "must be an object with 'input' and 'output'")
            input_text = item.get("input", "")
            input_text = "" if input_text is None else check_text(input_text, where, f"{prefix}input")
            output = check_text(item.get("output"), where, f"{prefix}output")
            if self.use_chat_template:
                prompt = f"{instruction}\n\n{input_text}" if input_text else instruction
            else:
                prompt = alpaca_prompt(instruction, input_text)
            examples.append(self._pair_example(prompt, output, where, "instruction", f"{prefix}output"))
        return examples

    def _pair_example(
        self, prompt: str, completion: str, where: str, prompt_field: str | None, completion_field: str | None
    ) -> Example:
        for marker in self.end_markers:
            if completion.endswith(marker):
                completion = completion[: -len(marker)]
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            example = self._chat_example(messages, where)
            fields = {False: prompt_field, True: completion_field}  # the row's fields, not the turns we made of them
            example.segments = [segment._replace(field=fields[segment.trainable]) for segment in example.segments]
            return example
        segments = [Segment(prompt, False, prompt_field), Segment(completion, True, completion_field)]
        reason = empty_response(self.tokenizer, completion)
        return Example(segments, True, {1: reason} if reason else {})

    def _chat_example(self, messages: list[dict[str, str]], where: str) -> Example:
        segments = chat_segments(self.tokenizer, messages, where)
        responses = [k for k, segment in enumerate(segments) if segment.trainable]
        replies = [message["content"] for message in messages if message["role"] == "assistant"]
        reasons = {k: empty_response(self.tokenizer, content) for k, content in zip(responses, replies)}
        return Example(segments, False, {k: reason for k, reason in reasons.items() if reason})
