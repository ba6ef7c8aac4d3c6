"""Checkpoint loading that never runs code from the file and names the file when it is damaged."""

from __future__ import annotations

import pickle
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely: truncated, corrupted, or holding more than tensors and plain data."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``weights_only=True`` always (a checkpoint is data: anything that would have to
    run code to unpickle is refused) and errors that name the file. Writes stay Lightning's atomic ones (serialised in
    memory, then written through a file-system transaction, so a killed write never replaces a good checkpoint).

    ``lit-align`` installs it on the Trainer; in your own project pass ``Trainer(plugins=[SafeCheckpointIO()])``.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"{path}: lit_align loads checkpoints with weights_only=True only")
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
        if isinstance(error, pickle.UnpicklingError):
            return CheckpointError(
                f"checkpoint {path} holds objects that only arbitrary code could rebuild: refused (weights_only). "
                "Checkpoints written by lit_align hold tensors and plain data only."
            )
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be read ({type(error).__name__}); resume from an "
            "earlier checkpoint"
        )
