"""What the DataModules share: reading the sources, the validation split, and the data loaders."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_align.data.sources import DataError, DataSource, Record, read_records

log = logging.getLogger(__name__)


def resolve_sources(source: DataSource | Sequence[str]) -> list[Record]:
    """Records from one source or a list of file paths / hub ids (read in order)."""
    if isinstance(source, Sequence) and not isinstance(source, str) and all(isinstance(s, str) for s in source):
        return [record for s in source for record in read_records(s)]
    return read_records(source)


class RecordsDataModule(L.LightningDataModule):
    """Base of the DataModules: subclasses set ``train_data``, ``val_data``, ``val_fraction``, ``bad_rows``, ``seed``,
    ``batch_size``, ``num_workers`` and ``collator``, and implement :meth:`encode_record`."""

    train_data: DataSource | list[str]
    val_data: DataSource | list[str] | None
    val_fraction: float
    bad_rows: str
    seed: int
    batch_size: int
    num_workers: int
    collator: Any

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Counter] = {}
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None

    def encode_record(self, record: Record, index: int, counts: Counter) -> list[dict[str, Any]]:
        """The tokenized examples of one row; raises ``DataError`` for a malformed row and counts what it drops."""
        raise NotImplementedError

    def encode_records(self, records: Sequence[Record], split: str) -> list[dict[str, Any]]:
        """Tokenize ``records``, counting what is kept and dropped in ``self.stats[split]`` (and logging the counts).
        Malformed rows raise, or with ``bad_rows="skip"`` are skipped and counted."""
        counts = self.stats[split] = Counter(rows=len(records))
        examples = []
        for index, record in enumerate(records):
            try:
                examples += self.encode_record(record, index, counts)
            except DataError as error:
                if self.bad_rows == "error":
                    raise
                counts["skipped_bad_row"] += 1
                log.warning("skipping bad row: %s", error)
        counts["examples"] = len(examples)
        if records:
            rank_zero_info(f"lit_align {split} data: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        train_records = resolve_sources(self.train_data)
        if self.val_data is not None:
            val_records = resolve_sources(self.val_data)
        else:
            order = list(range(len(train_records)))
            random.Random(self.seed).shuffle(order)
            held_out = set(order[: round(len(order) * self.val_fraction)])
            val_records = [r for i, r in enumerate(train_records) if i in held_out]
            train_records = [r for i, r in enumerate(train_records) if i not in held_out]
        self.train_dataset = self.encode_records(train_records, "train")
        self.val_dataset = self.encode_records(val_records, "val")
        if not self.train_dataset:
            raise ValueError(f"no usable training examples; counts: {dict(self.stats['train'])}")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset or [],
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )
