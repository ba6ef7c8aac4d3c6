"""Lightning strategies for several devices. ``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` set up for
data-parallel sharding (FSDP2 over every rank), with the options lit_align's modules read when they shard their
models in ``configure_model``, and checksums on the distributed checkpoints it writes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from lit_align.checkpoint import (
    CheckpointError,
    safe_distributed_reads,
    verify_checkpoint,
    verify_distributed_checkpoint,
)
from lit_align.checksums import ChecksumError, write_checksums


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2, torch's ``fully_shard``) over all devices: each rank holds a shard of
    every weight, gradient and optimizer state, and all-gathers one transformer block at a time for its forward and
    backward. The modules shard their trainable models (policy, PPO's value model) and, unless
    ``replicate_frozen``, their frozen ones (reference, reward model) in ``configure_model``.

    Use it from YAML (``-c configs/strategies/fsdp2.yaml``) or ``Trainer(strategy=FSDP2Strategy(), devices=N)``.

    Args:
        replicate_frozen: keep a whole copy of the frozen models (reference, reward model) on every rank instead of
            sharding them: no all-gathers for their forwards, at the cost of their full memory on every rank (a
            good trade when they are small).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3: least memory, the
            block is gathered again for the backward); ``False`` keeps them until the backward (ZeRO-2-like: one
            all-gather fewer per block, more memory).
        gather_for_generation: all-gather the whole policy once per rollout before sampling, and reshard after:
            sampling then issues no collective at all, so ranks whose completions end at different steps never
            wait on each other, and no layer is gathered at every decoding step. Costs the policy's full memory on
            every rank while sampling; ``False`` gathers layer by layer at each step, with all ranks stepping
            together (``synced_gpus``).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint directory, with a SHA-256 manifest
            of its files that is verified before loading); ``False`` gathers full weights and optimizer states on
            rank 0 into one file.
        data_parallel_size: ranks to shard over (``"auto"``: all of them). lit_align's modules do not use tensor
            parallelism: ``tensor_parallel_size`` must be 1.
        process_group_backend, timeout: as Lightning's (a collective that waits longer than ``timeout`` fails
            instead of hanging).

    With fp16 and loss scaling (``precision="16-mixed"``), the gradient scaler's overflow check is all-reduced over
    the ranks (torch's ``ShardedGradScaler``): a rank sees only its shards, and all must skip the same steps.
    """

    def __init__(
        self,
        replicate_frozen: bool = False,
        reshard_after_forward: bool = True,
        gather_for_generation: bool = True,
        save_distributed_checkpoint: bool = True,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("lit_align's modules shard data-parallel only: tensor_parallel_size must be 1")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.replicate_frozen = replicate_frozen
        self.reshard_after_forward = reshard_after_forward
        self.gather_for_generation = gather_for_generation

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None and not isinstance(scaler, ShardedGradScaler):
            # fp16 with loss scaling: each rank checks only its own gradient shards for overflow, so the verdict
            # must be all-reduced, or one rank would skip a step that another takes.
            self.precision_plugin.scaler = ShardedGradScaler(
                device=self.root_device.type, init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
                backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval(),
            )  # fmt: skip

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # Lightning's "auto" is the number of nodes (tensor parallel within)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        if path.is_dir():  # a distributed checkpoint: every rank has written its shard
            self.barrier("lit_align.checksums")
            if self.global_rank == 0:
                write_checksums(path)
            self.barrier("lit_align.checksums_written")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"{checkpoint_path}: lit_align loads checkpoints with weights_only=True only")
        path = Path(self.broadcast(checkpoint_path))
        problem = None
        if self.global_rank == 0:  # rank 0 checks the files, every rank gets its verdict
            try:
                verify_distributed_checkpoint(path) if path.is_dir() else verify_checkpoint(path)
            except (ChecksumError, CheckpointError) as error:
                problem = str(error)
        problem = self.broadcast(problem)
        if problem is not None:
            raise CheckpointError(problem)
        with safe_distributed_reads():
            return super().load_checkpoint(path, weights_only=True)


def sharding_options(strategy: Any) -> dict[str, bool]:
    """The sharding options of ``strategy`` (an :class:`FSDP2Strategy`'s, or the defaults for Lightning's plain
    ``ModelParallelStrategy``)."""
    return {
        "replicate_frozen": getattr(strategy, "replicate_frozen", False),
        "reshard_after_forward": getattr(strategy, "reshard_after_forward", True),
        "gather_for_generation": getattr(strategy, "gather_for_generation", True),
    }
