"""``lit-align``: the LightningCLI entry point (``lit-align fit -c configs/sft.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from lit_align import security
from lit_align.checkpoint import CheckpointError, SafeCheckpointIO, read_checkpoint_metadata, safe_distributed_reads
from lit_align.modules.base import AlignModule
from lit_align.security import ALLOWED_IMPORTS, ImportRefused

__all__ = ["ALLOWED_IMPORTS", "AlignCLI", "ImportRefused", "main", "run"]


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode (``--model lit_align.SFTModule`` or your own subclass), with the DataModule's
    tokenizer linked to the model's so that it is set in one place. Configs, command lines and a resumed checkpoint's
    hyper-parameters may name only allow-listed classes (:data:`~lit_align.security.ALLOWED_IMPORTS`, see
    :func:`~lit_align.security.config_guard`); checkpoints load with ``weights_only`` only, verified first."""

    def __init__(self, *args, allowed_imports: Sequence[str] = (), **kwargs) -> None:
        self.allowed = security.allowed_imports(allowed_imports)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        with security.guarded(self.allowed):
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("weights_only") is False:
            raise CheckpointError("--weights_only false: lit_align loads checkpoints with weights_only=True only")

    def _parse_ckpt_path(self) -> None:
        # A resumed checkpoint's hyper-parameters name the model class and its arguments: read them from the
        # verified file (or a distributed checkpoint's meta.pt) with weights_only, never let them turn on remote
        # code, and parse them under the same guard as a config.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is None or not Path(path).exists():
            return
        hparams = dict(read_checkpoint_metadata(path).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        for name in security.CALLER_ONLY_HPARAMS:
            hparams.pop(name, None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        with security.guarded(self.allowed):
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_classes(self) -> None:
        with security.guarded(self.allowed):
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        connector = trainer.strategy
        if type(connector.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            connector.checkpoint_io = SafeCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        with safe_distributed_reads():  # whatever strategy resumes a distributed checkpoint
            super()._run_subcommand(subcommand)


def run(args: list[str] | None = None, run: bool = True, allowed_imports: Sequence[str] = ()) -> AlignCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; returns the CLI.
    ``allowed_imports`` adds allow-list entries (see :data:`~lit_align.security.ALLOWED_IMPORTS`)."""
    return AlignCLI(
        AlignModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        allowed_imports=allowed_imports,
    )


def main() -> None:
    """The ``lit-align`` console script."""
    import torch.distributed as dist

    run()
    if dist.is_available() and dist.is_initialized():  # leave together: a rank exiting first can abort the others
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
