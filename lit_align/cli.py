"""``lit-align``: the LightningCLI entry point (``lit-align fit -c configs/sft.yaml``)."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from lit_align.checkpoint import SafeCheckpointIO
from lit_align.modules.base import AlignModule

# What a config may name as a class_path (or a callable to instantiate): module prefixes and exact names. Anything
# else, ``os.system`` or ``subprocess.Popen`` say, is refused before it is imported. Extend it for your own code with
# LIT_ALIGN_ALLOWED_IMPORTS="my_pkg,other_pkg.callbacks" or ``run(..., allowed_imports=[...])``.
ALLOWED_IMPORTS = (
    "lit_align.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "lightning.pytorch.profilers.",
    "lightning.pytorch.accelerators.",
    "lightning.fabric.plugins.",
    "datetime.timedelta",
)


class ImportRefused(ValueError):
    """A config named something to import that is not on the allow-list."""


def allowed_imports(extra: Sequence[str] = ()) -> tuple[str, ...]:
    from_env = [p.strip() for p in os.environ.get("LIT_ALIGN_ALLOWED_IMPORTS", "").split(",") if p.strip()]
    return (*ALLOWED_IMPORTS, *extra, *from_env)


def is_allowed(name: str, allowed: Sequence[str]) -> bool:
    return any(name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")
               or name == prefix for prefix in allowed)  # fmt: skip


@contextmanager
def import_allow_list(allowed: Sequence[str]) -> Iterator[list[str]]:
    """Within the block, jsonargparse may import only names on ``allowed``; the refused names are collected."""
    import jsonargparse._util as util

    original, refused = util.import_object, []

    def guarded(name, *args, **kwargs):
        # Only dotted paths name something to import; plain values (``simple``, ``true``) that jsonargparse also
        # tries while matching a union type are not imports of anything a config chose.
        if isinstance(name, str) and "." in name and not is_allowed(name, allowed):
            refused.append(name)
            raise ImportRefused(f"{name!r} is not on lit_align's import allow-list")
        return original(name, *args, **kwargs)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "import_object", None) is original]
    patched = [m for m in patched if getattr(m, "__name__", "").startswith("jsonargparse")]
    for module in patched:
        module.import_object = guarded
    try:
        yield refused
    finally:
        for module in patched:
            module.import_object = original


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode (``--model lit_align.SFTModule`` or your own subclass), with the DataModule's
    tokenizer linked to the model's so that it is set in one place. Configs may name only allow-listed imports
    (:data:`ALLOWED_IMPORTS`)."""

    def __init__(self, *args, allowed_imports: Sequence[str] = (), **kwargs) -> None:
        self.allowed_imports = globals()["allowed_imports"](allowed_imports)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a resumed checkpoint's hyper-parameters before the Trainer exists, and imports the
        # class they name: the same allow-list, the same safety and messages as SafeCheckpointIO.
        with import_allow_list(self.allowed_imports) as refused:
            try:
                super()._parse_ckpt_path()
            except SystemExit:
                if refused:
                    raise ImportRefused(_refusal(refused)) from None
                raise
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
                if refused:
                    raise ImportRefused(_refusal(refused)) from None
                subcommand = self.config.get("subcommand")
                path = self.config[subcommand].get("ckpt_path") if subcommand else None
                raise SafeCheckpointIO.explain(path, error) from error
        if refused:
            raise ImportRefused(_refusal(refused))

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        connector = trainer.strategy
        if type(connector.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            connector.checkpoint_io = SafeCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:
        with import_allow_list(self.allowed_imports) as refused:
            try:
                super().parse_arguments(parser, args)
            except SystemExit:
                if refused:
                    raise ImportRefused(_refusal(refused)) from None
                raise
        if refused:  # a refusal that a union type swallowed still stops the run
            raise ImportRefused(_refusal(refused))


def _refusal(names: list[str]) -> str:
    listed = ", ".join(sorted(set(names)))
    return (
        f"refusing to import {listed}: configs may only name classes from {', '.join(ALLOWED_IMPORTS)}. "
        "To allow your own code, set LIT_ALIGN_ALLOWED_IMPORTS=your_package (comma-separated prefixes)."
    )


def run(args: list[str] | None = None, run: bool = True, allowed_imports: Sequence[str] = ()) -> AlignCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; returns the CLI.
    ``allowed_imports`` adds module prefixes a config may name (besides :data:`ALLOWED_IMPORTS`)."""
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
    run()


if __name__ == "__main__":
    main()
