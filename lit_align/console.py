"""The ``lit-align`` console script's first step: sets how long torch's CPU threads spin (:data:`GOMP_SPINCOUNT`),
answers ``--version`` at once and says what it is loading before the several seconds that importing torch and
Lightning take, then hands over to :func:`lit_align.cli.main`."""

from __future__ import annotations

import os
import sys

#: how long an OpenMP thread of torch's CPU kernels spins waiting for work before it sleeps (GNU libgomp's default
#: is 300,000 spins), measured with benchmarks/contention.py: when another process shares the cores, where spinning
#: threads steal each other's turns, a short PPO run slows 1.70x instead of 2.70x and the tiny DPO step 1.73x instead
#: of 4.85x; idle, the PPO run is as fast and the tiny DPO step 20% slower (many short kernels)
GOMP_SPINCOUNT = "2000"


def main() -> int | None:
    # before torch (and its libgomp) loads; a user's own OpenMP wait settings win
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    args = sys.argv[1:]
    if args == ["--version"]:
        from lit_align import __version__

        print(f"lit-align {__version__}")
        return 0
    if sys.stderr.isatty() and args and args[0] not in ("-h", "--help"):
        print(f"lit-align {args[0]}: importing torch and Lightning ...", file=sys.stderr, flush=True)
    from lit_align.cli import main as cli_main

    return cli_main()
