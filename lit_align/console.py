"""The ``lit-align`` console script's first step: answers ``--version`` at once and says what it is loading before
the several seconds that importing torch and Lightning take, then hands over to :func:`lit_align.cli.main`."""

from __future__ import annotations

import sys


def main() -> int | None:
    args = sys.argv[1:]
    if args == ["--version"]:
        from lit_align import __version__

        print(f"lit-align {__version__}")
        return 0
    if sys.stderr.isatty() and args and args[0] not in ("-h", "--help"):
        print(f"lit-align {args[0]}: importing torch and Lightning ...", file=sys.stderr, flush=True)
    from lit_align.cli import main as cli_main

    return cli_main()
