"""How much slower a short PPO run gets when another process shares the cores, with GNU OpenMP's default spin-wait
and with the shorter one the ``lit-align`` console script sets (``GOMP_SPINCOUNT=2000``, see lit_align/console.py).

    python benchmarks/contention.py --repeats 2

Each run is ``lit-align fit -c configs/ppo.yaml`` (tiny model, 4 rollout batches, no validation, no logging) in a
fresh process; the settings alternate. "Contended" runs share the machine with a second process doing 2-thread fp32
matmuls (also torch, default settings) for the whole run. Prints the median wall time of each setting and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMAND = ["lit-align", "fit", "-c", "configs/ppo.yaml", "--trainer.limit_train_batches", "4",
           "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "/tmp/lit_align_contention",
           "--model.init_args.export_dir", "null", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"]  # fmt: skip
SETTINGS = {"GNU default (300000 spins)": "300000", "lit-align (2000 spins)": "2000"}
COMPETITOR = "import torch; torch.set_num_threads(2); a = torch.randn(1500, 1500)\nwhile True: a @ a"


def timed(spins: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"GOMP_SPINCOUNT": spins}
    start = time.perf_counter()
    subprocess.run(COMMAND, env=env, check=True, capture_output=True, timeout=1200)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} CPUs")
    results: dict[tuple[str, str], list[float]] = {}
    for contended in (False, True):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if contended else None
        try:
            time.sleep(2 if contended else 0)
            for _ in range(args.repeats):
                for name, spins in SETTINGS.items():
                    results.setdefault(("contended" if contended else "idle", name), []).append(timed(spins))
        finally:
            if competitor is not None:
                competitor.kill()
    for (state, name), times in results.items():
        print(f"{state:9s} {name:28s} median {statistics.median(times):6.1f} s  runs {[round(t, 1) for t in times]}")
    for name in SETTINGS:
        slow = statistics.median(results[("contended", name)]) / statistics.median(results[("idle", name)])
        print(f"slowdown under contention, {name}: {slow:.2f}x")


if __name__ == "__main__":
    main()
