"""``lit-align``: the LightningCLI entry point (``lit-align fit -c configs/sft.yaml``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lit_align.modules.base import AlignModule


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode (``--model lit_align.SFTModule`` or your own subclass), with the DataModule's
    tokenizer linked to the model's so that it is set in one place."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")


def run(args: list[str] | None = None, run: bool = True) -> AlignCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; returns the CLI."""
    return AlignCLI(
        AlignModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """The ``lit-align`` console script."""
    run()


if __name__ == "__main__":
    main()
