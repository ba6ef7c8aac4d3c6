"""What the DataModules share: reading the sources, the validation split, and the data loaders."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lit_align.data.sources import DataError, DataSource, Record, UnreadableRow, read_records
from lit_align.ops import IGNORE_INDEX

log = logging.getLogger(__name__)


def resolve_sources(source: DataSource | Sequence[str]) -> list[Record]:
    """Records from one source or a list of file paths / hub ids (read in order)."""
    if isinstance(source, Sequence) and not isinstance(source, str) and all(isinstance(s, str) for s in source):
        return [record for s in source for record in read_records(s)]
    return read_records(source)


def example_prompt_ids(example: Mapping[str, Any]) -> list[int]:
    """The prompt of a tokenized example: its ``prompt_ids`` (preference, unpaired and prompt examples), else the
    tokens of an SFT example (``input_ids``, ``labels``) before its first labelled one."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:start])


@dataclass
class PredictCollator:
    """The DataModule's own collator, each batch also carrying ``prompt_ids`` (one token list per example, see
    :func:`example_prompt_ids`) and, when the examples have responses, ``response_ids`` (every example's responses in
    order, so that response ``n`` of the batch is ``response_ids[n]``), for ``predict_step`` to sample from and to
    decode."""

    collator: Any

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch["prompt_ids"] = [example_prompt_ids(e) for e in examples]
        if examples and all("response_ids" in e for e in examples):
            batch["response_ids"] = [list(r) for e in examples for r in e["response_ids"]]
        return batch


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``, sharded over ``num_replicas`` ranks, and
    resumable mid-epoch.

    Every rank computes the same global order; global batch ``i`` is ``batch_size x num_replicas`` consecutive
    examples of it, and rank ``r`` takes the ``r``-th slice of each (with ``lengths``, the global order is grouped
    by length first, so every rank's batch holds similar lengths too). The order is padded to a multiple of
    ``num_replicas`` with its first examples, as ``DistributedSampler`` pads, so every rank has the same number of
    batches. With one rank this is the plain shuffled order.

    Lightning calls :meth:`set_epoch` at every epoch start; the DataModule counts the batches that reach the
    training step (:meth:`consumed`), and the count is checkpointed with the loop state, so that a resumed run
    continues with exactly the batch after the last one trained on: none replayed, none skipped, on every rank.
    (A ``DistributedSampler`` subclass, so Lightning does not wrap it in one of its own.)
    """

    def __init__(
        self, size: int, batch_size: int, seed: int = 0, shuffle: bool = True, lengths: Sequence[int] | None = None,
        num_replicas: int = 1, rank: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.size, self.batch_size = size, batch_size
        self.lengths = lengths
        self.epoch, self.batches_done, self._resume_at = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done, self._resume_at = epoch, 0, 0

    def order(self) -> list[int]:
        """The global order of the epoch (every rank's examples, before sharding and padding)."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return order
        # Random chunks of 64 global batches; within a chunk, batches of similar lengths, in random order.
        step = self.batch_size * self.num_replicas
        chunk, grouped = step * 64, []
        for start in range(0, len(order), chunk):
            ranked = sorted(order[start : start + chunk], key=lambda j: -self.lengths[j])
            batches = [ranked[b : b + step] for b in range(0, len(ranked), step)]
            last = batches.pop() if len(batches[-1]) < step else []  # a short batch stays at the end
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[b]
            grouped += last
        return grouped

    def rank_order(self) -> list[int]:
        """This rank's examples of the epoch, in order."""
        order = self.order()
        pad = -len(order) % self.num_replicas  # every rank as many examples: repeat from the start
        order += (order * (pad // max(len(order), 1) + 1))[:pad] if order else []
        step, mine = self.batch_size * self.num_replicas, []
        for start in range(0, len(order), step):
            batch = order[start : start + step]
            share = len(batch) // self.num_replicas
            mine += batch[self.rank * share : (self.rank + 1) * share]
        return mine

    def __iter__(self):
        start, self._resume_at = self._resume_at * self.batch_size, 0
        self.batches_done = start // self.batch_size
        return iter(self.rank_order()[start:])

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def consumed(self) -> None:
        self.batches_done += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "size": self.size, "seed": self.seed,
                "num_replicas": self.num_replicas}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state.get("size"), state.get("seed"), state.get("num_replicas", 1))
        if saved != (self.size, self.seed, self.num_replicas):
            raise ValueError(
                f"cannot resume the data order: the checkpoint was taken on {saved[0]} training examples with seed "
                f"{saved[1]} on {saved[2]} rank(s); this run has {self.size} with seed {self.seed} on "
                f"{self.num_replicas}"
            )
        epoch, done = state["epoch"], state["batches_done"]
        if done >= -(-len(self) // self.batch_size):  # saved after the epoch's last batch: resume at the next epoch
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
    ``batch_size``, ``num_workers`` and ``collator``, and implement :meth:`encode_record`.

    The held-out split (``val_data``, or ``val_fraction`` of ``train_data``) is both the validation loader and the
    test loader (``lit-align test`` logs it as ``test/...``). Each split's kept and dropped counts are logged when
    it is set up, and a warning names the split when more than :attr:`max_dropped_share` (half) of its rows yield
    no example."""

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
        examples, kept_rows = [], 0
        for index, record in enumerate(records):
            try:
                if isinstance(record.row, UnreadableRow):
                    raise DataError(record.where, None, record.row.problem)
                encoded = self.encode_record(record, index, counts)
                examples += encoded
                kept_rows += bool(encoded)
            except DataError as error:
                if self.bad_rows == "error":
                    raise
                counts["skipped_bad_row"] += 1
                log.warning("skipping bad row: %s", error)
        counts["examples"] = len(examples)
        if records:
            rank_zero_info(f"lit_align {split} data: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
            self.warn_if_dropped(split, kept_rows, counts)
        return examples

    #: share of a split's rows that may yield no example before :meth:`warn_if_dropped` warns
    max_dropped_share: float = 0.5

    def warn_if_dropped(self, split: str, kept_rows: int, counts: Counter) -> None:
        """Warn (rank zero) when more than :attr:`max_dropped_share` of the ``split``'s rows yielded no example,
        naming the split, the rows kept out of the total and the largest drop counts (``dropped_*``, ``skipped_*``):
        a ``max_length`` too short for the data, for instance, would otherwise only show in the counts line."""
        rows = counts["rows"]
        if rows == 0 or (rows - kept_rows) / rows <= self.max_dropped_share:
            return
        reasons = sorted(((v, k) for k, v in counts.items() if k.startswith(("dropped_", "skipped_")) and v),
                         reverse=True)  # fmt: skip
        why = ", ".join(f"{k}={v}" for v, k in reasons[:3]) or "see the counts above"
        rank_zero_warn(
            f"lit_align {split} data: only {kept_rows} of {rows} rows kept ({(rows - kept_rows) / rows:.0%} dropped, "
            f"more than {self.max_dropped_share:.0%}); main reasons: {why}. Check max_length / max_prompt_length "
            "and the data's fields."
        )

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
        """Shuffled in an order fixed by ``seed`` and the epoch, sharded over the data-parallel ranks, and
        resumable mid-epoch from a checkpoint (see :class:`ResumableSampler`)."""
        lengths = [self.example_length(e) for e in self.train_dataset] if self.group_by_length else None
        self._sampler = ResumableSampler(
            len(self.train_dataset), self.batch_size, self.seed, lengths=lengths, **self.shard_kwargs()
        )
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

    def shard_kwargs(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of this process among the data-parallel ranks (1 and 0 without a
        Trainer or on one device)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return {"num_replicas": 1, "rank": 0}
        kwargs = self.trainer.distributed_sampler_kwargs or {}
        return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and getattr(self, "_sampler", None) is not None:
            self._sampler.consumed()
        return batch

    def val_dataloader(self) -> DataLoader:
        """In order. With several data-parallel ranks (which Lightning shards with its ``DistributedSampler``), the
        held-out set is padded to a multiple of the rank count with :meth:`neutral_example` copies, which every
        metric ignores: no rank waits on another at the end, and the padding does not skew the metrics."""
        dataset = list(self.val_dataset or [])
        replicas = self.shard_kwargs()["num_replicas"]
        if replicas > 1 and dataset:
            dataset += [self.neutral_example(dataset[i % len(dataset)]) for i in range(-len(dataset) % replicas)]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # no draw from the training RNG (see above)
        )

    def test_dataloader(self) -> DataLoader:
        """The held-out split again, loaded as :meth:`val_dataloader` loads it: ``lit-align test`` (``trainer.test``)
        reports on the same held-out rows as validation (``val_data``, or the ``val_fraction`` held out from
        ``train_data``), as ``test/...`` metrics. To test on another set, point ``val_data`` at it for the test run
        (``lit-align test -c <config> --data.init_args.val_data test.jsonl``)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out split for ``lit-align predict`` (``trainer.predict``), in order, as :meth:`test_dataloader`
        serves it but with no padding copies (Lightning's predict sampler shards without repeating) and with each
        example's prompt in the batch (:class:`PredictCollator`): policies sample completions for those prompts, a
        reward model scores the split's responses."""
        return DataLoader(
            list(self.val_dataset or []),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=PredictCollator(self.collator),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def neutral_example(self, example: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``example`` that pads a batch without counting in any metric (no labelled token, no pair, a
        prompt flagged as padding). Override for a new kind of example."""
        raise NotImplementedError
