"""Checkpoint loading that never runs code from the file, verifies the file's checksums, and names the file when it
is damaged."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
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


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint as one dictionary, from a file (checksums verified, ``weights_only``) or from a distributed
    checkpoint directory (``FSDP2Strategy``'s default: each rank's shard; its SHA-256 manifest verified, the shards
    consolidated into full tensors in CPU memory). For reading weights (``load_from_checkpoint``, exports); a
    distributed checkpoint's optimizer states stay in their own layout."""
    if not os.path.isdir(path):
        verify_checkpoint(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise SafeCheckpointIO.explain(path, error) from error
    from lit_align.checksums import ChecksumError, verify_checksums

    try:
        verify_checksums(path)
    except ChecksumError as error:
        raise CheckpointError(str(error)) from None
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:  # consolidated on disk, then read back as data
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        checkpoint = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    meta = Path(path) / "meta.pt"  # what Lightning keeps beside the shards (hyper-parameters, loops, callbacks)
    if meta.is_file():
        checkpoint.update(read_checkpoint(meta))
    return checkpoint


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
