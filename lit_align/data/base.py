"""What the DataModules share: reading the sources, the validation split, and the data loaders."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from lit_align.data.sources import DataError, DataSource, Record, UnreadableRow, read_records

log = logging.getLogger(__name__)


def resolve_sources(source: DataSource | Sequence[str]) -> list[Record]:
    """Records from one source or a list of file paths / hub ids (read in order)."""
    if isinstance(source, Sequence) and not isinstance(source, str) and all(isinstance(s, str) for s in source):
        return [record for s in source for record in read_records(s)]
    return read_records(source)


class ResumableSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)`` and which can resume mid-epoch.

    Lightning calls :meth:`set_epoch` at every epoch start; the DataModule counts the batches that reach the
    training step (:meth:`consumed`), and the count is checkpointed with the loop state, so that a resumed run
    continues with exactly the batch after the last one trained on: none replayed, none skipped.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int = 0, shuffle: bool = True, lengths: Sequence[int] | None = None
    ) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.lengths = lengths
        self.epoch, self.batches_done, self._resume_at = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done, self._resume_at = epoch, 0, 0

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return order
        # Random chunks of 64 batches; within a chunk, batches of similar lengths, in random order.
        chunk, grouped = self.batch_size * 64, []
        for start in range(0, len(order), chunk):
            ranked = sorted(order[start : start + chunk], key=lambda j: -self.lengths[j])
            batches = [ranked[b : b + self.batch_size] for b in range(0, len(ranked), self.batch_size)]
            last = batches.pop() if len(batches[-1]) < self.batch_size else []  # a short batch stays at the end
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[b]
            grouped += last
        return grouped

    def __iter__(self):
        start, self._resume_at = self._resume_at * self.batch_size, 0
        self.batches_done = start // self.batch_size
        return iter(self.order()[start:])

    def __len__(self) -> int:
        return self.size

    def consumed(self) -> None:
        self.batches_done += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size") != self.size or state.get("seed") != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint was taken on {state.get('size')} training examples "
                f"with seed {state.get('seed')}, this run has {self.size} with seed {self.seed}"
            )
        epoch, done = state["epoch"], state["batches_done"]
        if done >= -(-self.size // self.batch_size):  # saved after the epoch's last batch: resume at the next epoch
            epoch, done = epoch + 1, 0
        self.epoch, self.batches_done, self._resume_at = epoch, done, done


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning checkpoints (through ``state_dict``/``load_state_dict``)."""

    def _resumable(self) -> ResumableSampler:
        sampler = self.sampler  # under a distributed wrapper, ours is inside it
        while not isinstance(sampler, ResumableSampler):
            sampler = getattr(sampler, "sampler", None) or getattr(sampler, "_sampler", None)
            if sampler is None:
                raise TypeError("ResumableDataLoader needs a ResumableSampler")
        return sampler

    def state_dict(self) -> dict[str, int]:
        return self._resumable().state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resumable().load_state_dict(state)


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

    group_by_length: bool = False

    def example_length(self, example: dict[str, Any]) -> int:
        """Tokens an example occupies in a batch (for ``group_by_length``)."""
        if "input_ids" in example:
            return len(example["input_ids"])
        return len(example["prompt_ids"]) + sum(len(r) for r in example.get("response_ids", []))

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
                if isinstance(record.row, UnreadableRow):
                    raise DataError(record.where, None, record.row.problem)
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
        """Shuffled in an order fixed by ``seed`` and the epoch, and resumable mid-epoch from a checkpoint."""
        if self.trainer is not None and self.trainer.world_size > 1:
            # Several devices: Lightning's distributed sampler shards the data; exact mid-epoch resume (and length
            # grouping) are single-device for now.
            rank_zero_info("lit_align: several devices: data order by Lightning's DistributedSampler")
            self._sampler = None
            return DataLoader(
                self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=self.collator,
                num_workers=self.num_workers,
            )  # fmt: skip
        lengths = [self.example_length(e) for e in self.train_dataset] if self.group_by_length else None
        self._sampler = ResumableSampler(len(self.train_dataset), self.batch_size, self.seed, lengths=lengths)
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            # its own generator: starting an epoch's iterator must not draw from the global RNG (dropout's), or a
            # run resumed at an epoch boundary would see different dropout masks
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and getattr(self, "_sampler", None) is not None:
            self._sampler.consumed()
        return batch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset or [],
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # no draw from the training RNG (see above)
        )
