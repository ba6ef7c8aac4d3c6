"""What the DataModules share: reading the sources, the validation split, and the data loaders."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lit_align.data.sources import DataSource, Record, read_records


def resolve_sources(source: DataSource | Sequence[str]) -> list[Record]:
    """Records from one source or a list of file paths / hub ids (read in order)."""
    if isinstance(source, Sequence) and not isinstance(source, str) and all(isinstance(s, str) for s in source):
        return [record for s in source for record in read_records(s)]
    return read_records(source)


class RecordsDataModule(L.LightningDataModule):
    """Base of the DataModules: subclasses set ``train_data``, ``val_data``, ``val_fraction``, ``seed``,
    ``batch_size``, ``num_workers`` and ``collator``, and implement :meth:`encode_records`."""

    train_data: DataSource | list[str]
    val_data: DataSource | list[str] | None
    val_fraction: float
    seed: int
    batch_size: int
    num_workers: int
    collator: Any

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Counter] = {}
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None

    def encode_records(self, records: Sequence[Record], split: str) -> list[dict[str, Any]]:
        """Tokenize ``records``, counting what is kept and dropped in ``self.stats[split]``."""
        raise NotImplementedError

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
