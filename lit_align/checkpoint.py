"""Checkpoint loading that never runs code from the file, verifies the file's checksums, and names the file when it
is damaged."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely: truncated, corrupted, or holding more than tensors and plain data."""


_verified: dict[tuple[str, int, int], None] = {}  # files already checked, by (path, size, modification time)


def archive_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a file written by ``torch.save``, or ``None``. Such a file is a zip archive in which every
    record carries the CRC-32 checksum of its bytes, written with it; here every record is read back and its checksum
    compared, so a flipped byte in tensor data is found (``torch.load`` itself does not look)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        return f"is truncated or corrupted, or not a PyTorch file at all ({type(error).__name__}: {error})"
    if bad is not None:
        return f"is corrupted: the checksum (CRC-32) of its record {bad!r} does not match its bytes"
    _verified[key] = None
    return None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` unless the local checkpoint file's checksums hold (remote
    paths and distributed-checkpoint directories are left to their own readers)."""
    if not os.path.isfile(path):
        return
    problem = archive_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} {problem}; resume from an earlier checkpoint")


# What the metadata of a distributed checkpoint may hold: torch's own metadata records, sizes, dtypes, layouts and
# paths. torch reads that file with plain pickle, so it is checked with this list first.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                 "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "Path")}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")


def verify_distributed_checkpoint(path: str | os.PathLike) -> None:
    """Raise a :class:`CheckpointError` naming the file unless a distributed checkpoint directory is safe and intact
    to read: its SHA-256 manifest (when it has one) holds, and its ``.metadata``, which torch unpickles without
    restriction, holds nothing but torch's own metadata records (anything else could run code)."""
    from lit_align.checksums import ChecksumError, verify_checksums

    try:
        verify_checksums(path)
    except ChecksumError as error:
        raise CheckpointError(str(error)) from None
    metadata = Path(path) / ".metadata"
    if not metadata.is_file():
        raise CheckpointError(f"{path} is not a distributed checkpoint: it has no .metadata")
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as error:  # noqa: BLE001 - whatever fails, the file is not one torch wrote
        raise CheckpointError(f"distributed checkpoint metadata {metadata} is refused or corrupted: {error}") from None


@contextmanager
def safe_distributed_reads() -> Iterator[None]:
    """Within the block, the non-tensor entries of distributed checkpoints (optimizer hyper-parameters and such,
    which torch reads with ``torch.load(weights_only=False)``) are read with ``weights_only=True``."""
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.api import CheckpointException

    original = default_planner.DefaultLoadPlanner.load_bytes

    def load_bytes(self: Any, read_item: Any, value: Any) -> None:  # torch's, with weights_only=True
        try:
            data = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            entry = read_item.dest_index.fqn
            raise CheckpointError(
                f"a distributed checkpoint entry ({entry}) holds objects that only arbitrary code could rebuild: "
                "refused (weights_only)"
            ) from None
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], data)
        else:
            self.state_dict[read_item.dest_index.fqn] = data

    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
    try:
        yield
    except CheckpointException as error:  # torch wraps what failed on each rank: surface ours
        ours = [e for e, _ in error.failures.values() if isinstance(e, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise
    finally:
        default_planner.DefaultLoadPlanner.load_bytes = original


def _load_file(path: str | os.PathLike) -> dict[str, Any]:
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise SafeCheckpointIO.explain(path, error) from error


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's dictionary without the need of its weights in memory: from a file (verified, ``weights_only``,
    memory-mapped), or a distributed checkpoint's ``meta.pt`` (hyper-parameters, loops, callbacks; the directory
    verified first)."""
    if not os.path.isdir(path):
        return _load_file(path)
    verify_distributed_checkpoint(path)
    meta = Path(path) / "meta.pt"
    return _load_file(meta) if meta.is_file() else {}


@contextmanager
def consolidated_checkpoint(path: str | os.PathLike) -> Iterator[Path]:
    """Within the block, the path of a checkpoint file holding ``path``: ``path`` itself for a file, or for a
    distributed checkpoint directory (``FSDP2Strategy``'s default: a shard per rank) a temporary file where its
    shards are consolidated into full tensors, with Lightning's ``meta.pt`` merged in. The directory is verified
    first (:func:`verify_distributed_checkpoint`); the file is verified when it is read."""
    if not os.path.isdir(path):
        yield Path(path)
        return
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = read_checkpoint_metadata(path)
    with tempfile.TemporaryDirectory() as tmp, safe_distributed_reads():
        target = Path(tmp) / "consolidated.ckpt"
        dcp_to_torch_save(path, target)
        checkpoint = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
        checkpoint.update(meta)
        torch.save(checkpoint, target.with_suffix(".full"))
        del checkpoint
        os.replace(target.with_suffix(".full"), target)
        yield target


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``weights_only=True`` always (a checkpoint is data: anything that would have to
    run code to unpickle is refused), every record's checksum verified before loading, and errors that name the file.
    Writes stay Lightning's atomic ones (serialised in memory, then written through a file-system transaction, so a
    killed write never replaces a good checkpoint).

    ``lit-align`` installs it on the Trainer; in your own project pass ``Trainer(plugins=[SafeCheckpointIO()])``.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"{path}: lit_align loads checkpoints with weights_only=True only")
        if os.path.isdir(path):
            raise CheckpointError(
                f"{path} is a distributed checkpoint (a directory of shards): resume it with FSDP2Strategy (or "
                "Lightning's ModelParallelStrategy); Module.load_from_checkpoint reads its weights anywhere"
            )
        verify_checkpoint(path)
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=True, **kwargs)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise  # already say what is wrong, and with which path
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            raise self.explain(path, error) from error

    @staticmethod
    def explain(path: Any, error: BaseException) -> CheckpointError:
        """The error to raise for a checkpoint at ``path`` that ``torch.load`` refused with ``error``."""
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
            return CheckpointError(
                f"checkpoint {path} holds objects that only arbitrary code could rebuild: refused (weights_only). "
                "Checkpoints written by lit_align hold tensors and plain data only."
            )
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be read ({type(error).__name__}); resume from an "
            "earlier checkpoint"
        )
