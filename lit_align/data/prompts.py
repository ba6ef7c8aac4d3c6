"""``PromptDataModule``: prompts for on-policy methods (PPO), left-padded for generation, and an optional
pre-training text source for PPO-ptx."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import RecordsDataModule, ResumableDataLoader, ResumableSampler, resolve_sources
from lit_align.data.collate import SFTCollator
from lit_align.data.instruction import InstructionDataModule
from lit_align.data.preference import PreferenceDataModule
from lit_align.data.sources import DataError, DataSource, Record
from lit_align.data.tokenize import SegmentEncoder, check_messages, check_prompt_messages, check_text, render_chat
from lit_align.models import load_tokenizer
from lit_align.ops import IGNORE_INDEX, pad_sequences, position_ids_from_mask


def _template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template reads (``"{question}"`` -> ``["question"]``); only plain names."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"prompt_template {template!r}: {{{name}}} is not a plain field name")
        names.append(name)
    return names


@dataclass
class PromptCollator:
    """Left-pads prompts for generation: ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens
    only, so padding never shifts positions) ``[B, P]``, ``prompt_text`` (a list of the prompts as text, for
    reward functions that read text), ``keys`` ``[B]`` (each prompt's index in its split, which keyed sampling
    hashes), when the examples carry one, ``references`` (a list of reference answers for reward functions that
    check them), ``completion_ids`` (a list of each prompt's reference completion as token ids, when the examples carry
    one: ``PromptDataModule(completions=True)``), and when any example is padding (see
    :meth:`~lit_align.data.base.RecordsDataModule.neutral_example`), ``is_padding`` ``[B]`` (metrics skip those).

    Args:
        pad_token_id: id written at pad positions.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [e["prompt_ids"] for e in examples]
        attention_mask = pad_sequences([[1] * len(s) for s in ids], 0, "left")
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, "left"),
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "prompt_text": [e["prompt_text"] for e in examples],
        }
        if examples and all("reference" in e for e in examples):
            batch["references"] = [e["reference"] for e in examples]
        if examples and all("completion_ids" in e for e in examples):
            batch["completion_ids"] = [list(e["completion_ids"]) for e in examples]
        if examples and all("key" in e for e in examples):
            batch["keys"] = torch.tensor([e["key"] for e in examples], dtype=torch.long)
        if any(e.get("padding") for e in examples):
            batch["is_padding"] = torch.tensor([bool(e.get("padding")) for e in examples])
        return batch


class PromptDataModule(RecordsDataModule):
    """Prompts to sample responses to, with an optional pre-training text source for the PPO-ptx term.

    Prompt rows (detected per row): ``{"prompt": "..."}``; chat (``{"messages": [...]}`` or ``{"prompt": [...]}``,
    validated like any chat; a trailing assistant turn is dropped and the template's generation prompt added, so the
    prompt is what inference renders for the chat's last reply); the prompt side of
    preference rows (explicit, implicit Anthropic HH, ranked) and of instruction rows (Alpaca, Self-Instruct
    instances, prompt/completion, FLAN templates are not used here); or any row rendered by ``prompt_template``
    (GSM8K's ``{"question", "answer"}``). Bad rows are named or counted, as everywhere.

    Args:
        tokenizer: a tokenizer, or a name/path; under ``lit-align`` it follows the model's.
        train_data: prompt source (file, list of files, hub id, ``bundled:<file>``, or list of dicts).
        val_data: held-out prompts; if not given, ``val_fraction`` of the rows. The held-out split serves validation
            and ``lit-align test`` (``test/...`` metrics) alike.
        val_fraction: fraction of rows held out when ``val_data`` is not given.
        pretrain_data: text for the pre-training mix (rows ``{"text"}`` or any instruction shape, every token
            labelled); ``None`` for no ptx batches.
        prompt_template: a ``str.format`` template that renders each row's fields into its prompt, e.g.
            ``"Question: {question}\\nAnswer:"`` for GSM8K; ``None`` reads the row shapes above.
        reference_field: a row field handed to reward functions as ``references`` (e.g. GSM8K's ``answer``, for
            :class:`~lit_align.rewards.NumericAnswerReward`); ``None`` for none.
        max_prompt_length: longest prompt in tokens; longer prompts keep their last tokens (after any BOS).
        max_pretrain_length: longest pre-training sequence in tokens (cut at the end).
        assistant_marker: where implicit preference dialogues are split into prompt and response.
        bad_rows: ``"error"`` or ``"skip"`` (counted).
        batch_size: prompts per rollout batch on each device (and pre-training sequences per ptx batch).
        num_workers: data-loader worker processes.
        seed: seed for the validation split and the data order.
        completions: also keep each row's own response, for methods that train on the data's completions as well
            as on samples (on-policy distillation's ``lmbda < 1``): rows must then be instruction-shaped
            (prompt/completion, Alpaca, Self-Instruct, a chat: its last assistant turn), tokenized as SFT tokenizes
            them (the prompt an exact prefix), and batches carry ``completion_ids``. A row without a response is a
            ``DataError`` naming it.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "tiny",
        train_data: DataSource | list[str] = "bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz",
        val_data: DataSource | list[str] | None = None,
        val_fraction: float = 0.0,
        pretrain_data: DataSource | list[str] | None = None,
        prompt_template: str | None = None,
        reference_field: str | None = None,
        max_prompt_length: int = 256,
        max_pretrain_length: int = 256,
        assistant_marker: str = "\n\nAssistant:",
        bad_rows: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        completions: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if completions and (prompt_template is not None or reference_field is not None):
            raise ValueError(
                "completions: true reads instruction-shaped rows (prompt/completion, Alpaca, Self-Instruct, chats) as "
                "SFT reads them, so it takes no prompt_template or reference_field; set those to null"
            )
        self.completions = completions
        self.train_data, self.val_data, self.val_fraction = train_data, val_data, val_fraction
        self.pretrain_data = pretrain_data
        self.prompt_template, self.reference_field = prompt_template, reference_field
        self._template_fields = _template_fields(prompt_template) if prompt_template is not None else []
        self.max_prompt_length, self.max_pretrain_length = max_prompt_length, max_pretrain_length
        self.bad_rows = bad_rows
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.encoder = SegmentEncoder(self.tokenizer)
        self.collator = PromptCollator(self.tokenizer.pad_token_id)
        self.ptx_collator = SFTCollator(self.tokenizer.pad_token_id)
        # Row shapes shared with the other DataModules are parsed by them, so a prompt is rendered exactly as in
        # SFT and preference training.
        self._preferences = PreferenceDataModule(self.tokenizer, [], assistant_marker=assistant_marker)
        self._instructions = InstructionDataModule(self.tokenizer, [], max_length=max_pretrain_length)
        self._pretraining = InstructionDataModule(
            self.tokenizer, [], max_length=max_pretrain_length, train_on_prompt=True, bad_rows=bad_rows
        )
        self._with_completions = InstructionDataModule(self.tokenizer, [], max_length=1 << 30, bad_rows=bad_rows)
        self._ptx_sampler: ResumableSampler | None = None
        self.ptx_dataset: list[dict[str, Any]] | None = None

    # ----- prompts ------------------------------------------------------------------------------------------------
    def prompt_texts(self, record: Record, index: int) -> list[str]:
        """The prompt(s) of one row, as the text the model continues."""
        row, where = record.row, record.where
        if not isinstance(row, Mapping):
            raise DataError(where, None, f"must be an object with named fields, got {type(row).__name__}")
        if self.prompt_template is not None:
            fields = {}
            for name in self._template_fields:
                if name not in row:
                    raise DataError(where, name, f"is missing (prompt_template {self.prompt_template!r} needs it)")
                value = row[name]
                fields[name] = check_text(value if not isinstance(value, int | float) else str(value), where, name)
            return [self.prompt_template.format(**fields)]
        if "chosen" in row or "responses" in row:
            return ["".join(segment.text for segment in self._preferences.parse(record).prompt)]
        messages = row.get("messages", row.get("prompt"))
        if isinstance(messages, list):
            name = "messages" if "messages" in row else "prompt"
            if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
                turns = check_messages(messages, where, name)[:-1]  # a whole chat: prompt for its last reply
            else:
                turns = check_prompt_messages(messages, where, name)
            return [render_chat(self.tokenizer, turns, generation_prompt=True)]
        if "prompt" in row and "completion" not in row:
            return [check_text(row["prompt"], where, "prompt")]
        return [example.prompt() for example in self._instructions.record_examples(record, index)]

    def neutral_example(self, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "padding": True}

    def encode_record(self, record: Record, index: int, counts: Counter) -> list[dict[str, Any]]:
        if self.completions:
            return self.completion_examples(record, index, counts)
        examples = []
        for text in self.prompt_texts(record, index):
            if not text.strip():
                counts["dropped_empty_prompt"] += 1
                continue
            ids = self.encoder.encode([(text, False)], add_eos=False).input_ids
            if len(ids) > self.max_prompt_length:
                keep = len(self.encoder.prefix)
                ids = ids[:keep] + ids[len(ids) - (self.max_prompt_length - keep) :]
                counts["prompt_truncated"] += 1
            example = {"prompt_ids": ids, "prompt_text": text}
            if self.reference_field is not None:
                value = record.row.get(self.reference_field)
                value = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
                example["reference"] = check_text(value, record.where, self.reference_field)
            examples.append(example)
        return examples

    def completion_examples(self, record: Record, index: int, counts: Counter) -> list[dict[str, Any]]:
        """With ``completions``: each example of an instruction-shaped row as its prompt and its (last) response,
        split where SFT's labels start, so the prompt tokens are those inference encodes."""
        examples = []
        for encoded in self._with_completions.encode_record(record, index, counts):
            ids, labels = encoded["input_ids"], encoded["labels"]
            end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
            start = end
            while start > 0 and labels[start - 1] != IGNORE_INDEX:
                start -= 1
            prompt = ids[:start]
            if len(prompt) > self.max_prompt_length:
                keep = len(self.encoder.prefix)
                prompt = prompt[:keep] + prompt[len(prompt) - (self.max_prompt_length - keep) :]
                counts["prompt_truncated"] += 1
            text = self.tokenizer.decode(ids[:start], skip_special_tokens=True)
            examples.append({"prompt_ids": prompt, "prompt_text": text, "completion_ids": ids[start:end]})
        return examples

    # ----- pre-training mix ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for split, examples in ((0, self.train_dataset), (1, self.val_dataset or [])):
            for i, example in enumerate(examples):  # the prompt's key for keyed sampling: its index in its split
                example["key"] = 2 * i + split
        if self.pretrain_data is not None and self.ptx_dataset is None:
            records = [
                Record(r.where, {"prompt": "", "completion": r.row["text"]})
                if isinstance(r.row, Mapping) and "text" in r.row
                else r
                for r in resolve_sources(self.pretrain_data)
            ]
            self.ptx_dataset = self._pretraining.encode_records(records, "pretrain")
            self.stats["pretrain"] = self._pretraining.stats["pretrain"]
            if not self.ptx_dataset:
                raise ValueError(f"pretrain_data holds no usable text; counts: {dict(self.stats['pretrain'])}")

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        """The prompt loader, or ``{"prompts": ..., "ptx": ...}`` (cycled together) with ``pretrain_data``."""
        prompts = super().train_dataloader()
        if self.ptx_dataset is None:
            return prompts
        self._ptx_sampler = ResumableSampler(
            len(self.ptx_dataset), self.batch_size, self.seed + 1, **self.shard_kwargs()
        )
        ptx = ResumableDataLoader(
            self.ptx_dataset,
            batch_size=self.batch_size,
            sampler=self._ptx_sampler,
            collate_fn=self.ptx_collator,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed + 1),
        )
        return {"prompts": prompts, "ptx": ptx}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, Mapping) and "ptx" in batch and self._ptx_sampler is not None and self.trainer.training:
            self._ptx_sampler.consumed()
        return batch
