"""``lit-align``: the LightningCLI entry point (``lit-align fit -c configs/sft.yaml``)."""

from __future__ import annotations

import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_align import security
from lit_align.checkpoint import CheckpointError, SafeCheckpointIO, read_checkpoint_metadata, safe_distributed_reads
from lit_align.modules.base import AlignModule
from lit_align.security import ALLOWED_IMPORTS, ImportRefused

__all__ = ["ALLOWED_IMPORTS", "AlignCLI", "AllowedFromDirectory", "ImportRefused", "main", "run"]


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode (``--model lit_align.SFTModule`` or your own subclass), with the DataModule's
    tokenizer linked to the model's so that it is set in one place. Configs, command lines and a resumed checkpoint's
    hyper-parameters may name only allow-listed classes (:data:`~lit_align.security.ALLOWED_IMPORTS`, see
    :func:`~lit_align.security.config_guard`); checkpoints load with ``weights_only`` only, verified first."""

    def __init__(self, *args, allowed_imports: Sequence[str] = (), **kwargs) -> None:
        self.allowed = security.allowed_imports(allowed_imports)
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        from lit_align import __version__

        self.parser.add_argument("--version", action="version", version=f"lit-align {__version__}")

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
        if path == "last":  # Lightning's "last" looks only in this run's new version_N: resume the newest instead
            root = Path(self.config[subcommand].get("trainer", {}).get("default_root_dir") or Path.cwd())
            found = newest_checkpoint(root)
            if found is None:
                self.parser.error(f"--ckpt_path last: no checkpoint (*.ckpt) under {root.resolve()}")
            rank_zero_info(f"lit_align: --ckpt_path last: {found}")
            self.config[subcommand]["ckpt_path"] = path = str(found)
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


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently written checkpoint (a ``*.ckpt`` file, or a distributed checkpoint's ``*.ckpt``
    directory) anywhere under ``root``, the run's ``default_root_dir``: across its ``lightning_logs/version_N``
    directories, where each run writes its own. ``None`` when there is none."""
    root = Path(root)
    found = [p for p in root.rglob("*.ckpt") if not any(d.suffix == ".ckpt" for d in p.relative_to(root).parents)]
    found = [p for p in found if p.exists()]  # not a dangling link
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


class AllowedFromDirectory:
    """An import finder that finds, in ``directory``, only the top-level packages named in ``names``: the user's own
    allow-list entries (``LIT_ALIGN_ALLOWED_IMPORTS=my_pkg``), so that ``--model my_pkg.MySFT`` works from the
    directory that holds ``my_pkg`` as it does under ``python -m``. Placed after the normal finders: it shadows no
    installed or standard module, and no other file of the directory becomes importable. What a config may name is
    still decided by the allow-list (:mod:`lit_align.security`) alone."""

    def __init__(self, names: Sequence[str], directory: str | Path) -> None:
        self.names, self.directory = frozenset(names), str(directory)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or fullname not in self.names:  # submodules follow their package's own __path__
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])


def user_packages(allowed: Sequence[str]) -> list[str]:
    """The top-level package names of the allow-list entries the user added (not lit_align's own)."""
    own = {entry.split(".")[0] for entry in ALLOWED_IMPORTS}
    return sorted({entry.split(".")[0] for entry in allowed} - own)


def main() -> None:
    """The ``lit-align`` console script."""
    import torch.distributed as dist

    names = user_packages(security.allowed_imports())
    if names and not any(isinstance(f, AllowedFromDirectory) for f in sys.meta_path):
        sys.meta_path.append(AllowedFromDirectory(names, Path.cwd()))
    run()
    if dist.is_available() and dist.is_initialized():  # leave together: a rank exiting first can abort the others
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
