"""How much slower a short PPO run gets when another process shares the cores, with GNU OpenMP's default spin-wait
and with the shorter one the ``lit-align`` console script sets (``GOMP_SPINCOUNT=2000``, see lit_align/console.py).

    python benchmarks/contention.py --repeats 2
    python benchmarks/contention.py --vs-trl          # lit_align and TRL, DPO on the tiny model (vs_trl.py's case)

Each run is ``lit-align fit -c configs/ppo.yaml`` (tiny model, 4 rollout batches, no validation, no logging) in a
fresh process; the settings alternate. "Contended" runs share the machine with a second process doing 2-thread fp32
matmuls (also torch, default settings) for the whole run. Prints the median wall time of each setting and the ratios.

``--vs-trl``: instead, ``vs_trl.py``'s DPO case (live reference, tiny model, batch 8, length 512) on both sides, each
run a fresh worker process, useful tokens/s idle and contended, with each spin count set for both sides' workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

COMMAND = ["lit-align", "fit", "-c", "configs/ppo.yaml", "--trainer.limit_train_batches", "4",
           "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "/tmp/lit_align_contention",
           "--model.init_args.export_dir", "null", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"]  # fmt: skip
SETTINGS = {"GNU default (300000 spins)": "300000", "lit-align (2000 spins)": "2000"}
SIDES = ("lit_align", "trl")
COMPETITOR = "import torch; torch.set_num_threads(2); a = torch.randn(1500, 1500)\nwhile True: a @ a"


def timed(spins: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"GOMP_SPINCOUNT": spins}
    start = time.perf_counter()
    subprocess.run(COMMAND, env=env, check=True, capture_output=True, timeout=1200)
    return time.perf_counter() - start


def idle_then_contended(repeats: int, measure: Callable[[str], dict[str, float]]) -> dict[tuple, list[float]]:
    """{(idle/contended, setting, label): values}: ``measure(spins)`` ({label: value}) for each spin-count setting,
    ``repeats`` times alternating, first alone, then beside the competitor process."""
    results: dict[tuple, list[float]] = {}
    for contended in (False, True):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if contended else None
        try:
            time.sleep(2 if contended else 0)
            for _ in range(repeats):
                for name, spins in SETTINGS.items():
                    for label, value in measure(spins).items():
                        results.setdefault(("contended" if contended else "idle", name, label), []).append(value)
        finally:
            if competitor is not None:
                competitor.kill()
    return results


def vs_trl_tokens_per_s(repeats: int) -> dict[tuple, list[float]]:
    """``--vs-trl``: {(idle/contended, setting, side): useful tokens/s of each run}."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vs_trl

    with tempfile.TemporaryDirectory() as tmp:
        workdir, settings = Path(tmp), vs_trl.build_parser().parse_args(["--steps", "4", "--warmup", "1"])
        vs_trl.prepare(workdir, settings)

        def both_sides(spins: str) -> dict[str, float]:
            os.environ.pop("OMP_WAIT_POLICY", None)
            os.environ["GOMP_SPINCOUNT"] = spins  # both sides' workers inherit it
            return {side: vs_trl.worker(side, "dpo", workdir, settings)["tokens_per_s"] for side in SIDES}

        return idle_then_contended(repeats, both_sides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vs-trl", action="store_true", help="DPO tokens/s of lit_align and TRL (vs_trl.py)")
    args = parser.parse_args()
    if args.vs_trl:
        print(f"# load average at start: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} CPUs; DPO useful tok/s")
        rates = vs_trl_tokens_per_s(args.repeats)
        for name in SETTINGS:
            for side in SIDES:
                idle, busy = (statistics.median(rates[(state, name, side)]) for state in ("idle", "contended"))
                print(f"{name:28s} {side:9s} idle {idle:8,.0f}  contended {busy:8,.0f}  slowdown {idle / busy:.2f}x")
        return
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} CPUs")
    results = idle_then_contended(args.repeats, lambda spins: {"ppo": timed(spins)})
    for (state, name, _), times in results.items():
        print(f"{state:9s} {name:28s} median {statistics.median(times):6.1f} s  runs {[round(t, 1) for t in times]}")
    for name in SETTINGS:
        idle, busy = (statistics.median(results[(state, name, "ppo")]) for state in ("idle", "contended"))
        slow = busy / idle
        print(f"slowdown under contention, {name}: {slow:.2f}x")


if __name__ == "__main__":
    main()
