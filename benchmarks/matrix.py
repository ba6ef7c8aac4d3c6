"""lit_align vs TRL over a grid of model shapes, batch sizes and lengths, every cell checked for other work.

    pip install -e ".[bench]"
    python benchmarks/matrix.py --quick                  # a few minutes: 2 small shapes, batch 4, length 256
    python benchmarks/matrix.py --max-minutes 600        # the whole grid (hours on 2 cores)
    python benchmarks/matrix.py --shapes smollm2-135m --batches 8 --lengths 1024 --cases dpo --strict

Each cell (shape x batch x length x case) is ``benchmarks/vs_trl.py``'s measurement of that case: the same model
directory (random weights), tokenizer, Anthropic HH / Self-Instruct rows, batch, length, fp32 and threads on both
sides, lit_align and TRL alternating in fresh processes, warm-up steps discarded, ``--repeats`` pairs (min-max over
them). The GRPO case samples ``--group-size`` completions of ``--completion-length`` tokens for ``batch`` prompts.

The run pins the thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` in every
worker, which reports the count it ran with) and the CPUs it may use (``sched_setaffinity``, inherited by the
workers), and measures the machine's fp32 matmul rate (a 2048 x 2048 matmul on those threads, best of 5) at the start
and again at the end; MFU uses the better of the two.

Other work on the machine. The 1-minute load average is read before and after every cell and reported, but it
cannot say whose work it is: during a cell our own workers keep about ``--threads`` runnable, and it decays over a
minute afterwards. So the check uses CPU time instead: the busy CPU time of the whole machine (``/proc/stat``) minus
the CPU time of this process and its workers, over the cell's wall time, is the number of cores that *other* work
kept busy during the cell; a 2-second sample taken just before the cell, when nothing of ours runs, says the same
for the moment it starts. A cell is FLAGGED when either exceeds ``--max-other`` (default 0.5: on average, half a core
busy with something that is not this benchmark); with ``--strict`` a cell is not started while the machine is busy
(it waits up to ``--settle`` seconds, then refuses it) and a cell that saw other work is withheld (its numbers are
not reported). ``--max-minutes`` stops starting cells once that much time has passed and lists the cells skipped.

Results: one JSON line per cell appended to ``--out`` (every run's raw figures included) and a markdown table
written to ``--table``. ``--report JSONL`` writes the table again from an earlier run's JSON lines, with MFU from each
run's recorded FLOPs (so a table can be rebuilt, or merged from several runs' lines, without measuring again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402
from flops import LlamaShape  # noqa: E402

# Llama shapes (random weights). vocab 0: the tiny tokenizer's 4,096 ids; larger vocabularies leave the ids above
# the tokenizer's unused, so only the unembedding's size changes.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, vocab=0, tied=False),
    "small": dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, vocab=16_384, tied=True),
    "smollm2-135m": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49_152, tied=True),
    "0.4b": dict(hidden=1024, intermediate=4096, layers=24, heads=16, kv_heads=4, vocab=49_152, tied=True),
}
DEFAULT_CASES = "sft,reward,dpo,dpo_precomputed,grpo"
QUICK = dict(shapes="tiny,small", batches="4", lengths="256", cases="sft,dpo", repeats=1, steps=4, warmup=1)
TINY_VOCAB = 4096


# ----- the machine: CPU time, load, memory ---------------------------------------------------------------------------
def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU-seconds of this process and of its finished (waited-for) workers."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def other_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by other work over the next ``seconds`` (nothing of ours runs meanwhile)."""
    busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (busy_seconds() - busy - (own_seconds() - own)) / (time.perf_counter() - start))


def load_average() -> float:
    return os.getloadavg()[0]


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def needed_bytes(shape: LlamaShape, case: str) -> int:
    """A floor for one side's memory: fp32 weights, gradients and two Adam moments (16 bytes a parameter), plus a
    frozen reference copy (4) for a live-reference case; activations come on top."""
    return shape.params() * (16 + (4 if case in ("dpo", "grpo", "kto", "rloo") else 0))


# ----- the grid -------------------------------------------------------------------------------------------------------
def shape_of(name: str) -> LlamaShape:
    s = SHAPES[name]
    return LlamaShape(s["hidden"], s["intermediate"], s["layers"], s["heads"], s["kv_heads"], s["vocab"] or TINY_VOCAB,
                      s["tied"])  # fmt: skip


def cell_args(name: str, batch: int, length: int, cases: str, args: argparse.Namespace) -> argparse.Namespace:
    s = SHAPES[name]
    argv = [
        *("--cases", cases, "--repeats", str(args.repeats), "--steps", str(args.steps)),
        *("--warmup", str(args.warmup), "--batch-size", str(batch), "--max-length", str(length)),
        *("--threads", str(args.threads), "--hidden", str(s["hidden"]), "--layers", str(s["layers"])),
        *("--intermediate", str(s["intermediate"]), "--heads", str(s["heads"]), "--kv-heads", str(s["kv_heads"])),
        *("--vocab", str(s["vocab"]), "--grpo-prompts", str(batch), "--group-size", str(args.group_size)),
        *("--completion-length", str(args.completion_length)),
        *(("--tied",) if s["tied"] else ()),
    ]
    return vs_trl.build_parser().parse_args(argv)


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def table_row(cell: dict[str, Any]) -> str:
    where = f"| {cell['shape']} | {cell['batch']} | {cell['length']} | {vs_trl.CASES.get(cell['case'], cell['case'])} |"
    load = f"{cell.get('load_before', float('nan')):.2f} -> {cell.get('load_after', float('nan')):.2f}"
    other = f"{cell.get('other_before', float('nan')):.2f} / {cell.get('other_during', float('nan')):.2f}"
    if cell["status"] not in ("ok", "flagged"):
        return f"{where} {cell['status']}: {cell.get('reason', '')} | | | | | {load} | {other} |"
    r = cell["result"]
    mfu = r["mfu"]
    kind = "" if r["mfu_kind"] == "performed" else " (est.)"
    mfu_text = f"{spread(mfu['lit_align'], '{:.1%}')} / {spread(mfu['trl'], '{:.1%}')}{kind}"
    mem = f"{r['peak_rss_mb']['lit_align']:,.0f} / {r['peak_rss_mb']['trl']:,.0f} MB"
    flag = " **FLAGGED**" if cell["status"] == "flagged" else ""
    return (
        f"{where} {spread(r['tokens_per_s']['lit_align'])} | {spread(r['tokens_per_s']['trl'])} | "
        f"{spread(r['speed_ratio'], '{:.2f}')}x | {mfu_text} | {mem} | {load} | {other}{flag} |"
    )


def performed_mfu(cell: dict[str, Any], peak: float) -> None:
    """Set a cell's MFU from the FLOPs each of its runs actually performed, over ``peak`` FLOP/s, where every run
    recorded them (the others keep their estimate)."""
    result = cell.get("result")
    if result and all("flops_per_s" in run for runs in result["runs"].values() for run in runs):
        result["mfu"] = {impl: [run["flops_per_s"] / peak for run in runs] for impl, runs in result["runs"].items()}
        result["mfu_kind"] = "performed"


TABLE_HEAD = (
    "| shape | batch | length | case | lit_align useful tok/s | TRL useful tok/s | speed ratio | MFU lit_align / TRL "
    "| peak memory lit_align / TRL | load avg before -> after | other cores before / during |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and small shapes, batch 4, length 256, sft and dpo, "
                        "1 repeat of 1 warm-up + 4 timed steps (a few minutes)")  # fmt: skip
    parser.add_argument("--shapes", default="tiny,smollm2-135m,0.4b", help=f"among {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"among {', '.join(vs_trl.CASES)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8, help="GRPO: completions per prompt")
    parser.add_argument("--completion-length", type=int, default=32, help="GRPO: tokens sampled per completion")
    parser.add_argument("--max-other", type=float, default=0.5, help="cores of other work that flag a cell")
    parser.add_argument("--strict", action="store_true", help="refuse cells while other work runs; withhold flagged")
    parser.add_argument("--settle", type=float, default=60, help="--strict: seconds to wait for a busy machine")
    parser.add_argument("--max-minutes", type=float, default=0, help="start no cell after this many minutes (0: none)")
    parser.add_argument("--out", default="matrix.jsonl", help="JSON lines, one per cell, appended")
    parser.add_argument("--table", default="matrix.md", help="markdown table, written at the end")
    parser.add_argument("--report", metavar="JSONL", help="measure nothing: write --table from these JSON lines")
    args = parser.parse_args()
    if args.report:
        report(args)
        return
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    cases = args.cases.split(",")
    for case in cases:
        if case not in vs_trl.CASES:
            parser.error(f"--cases: unknown case {case!r}; known: {', '.join(vs_trl.CASES)}")
    batches, lengths = [int(b) for b in args.batches.split(",")], [int(n) for n in args.lengths.split(",")]

    import torch
    import transformers
    import trl

    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cpus)  # inherited by every worker
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = load_average()
    peak_start = vs_trl.matmul_flops(args.threads)
    print(
        f"# matrix: lit_align vs TRL {trl.__version__} | torch {torch.__version__}, transformers "
        f"{transformers.__version__} | {args.threads} threads (OMP/MKL/torch) on CPUs {cpus} of {os.cpu_count()} | "
        f"fp32 matmul {peak_start / 1e9:.1f} GFLOP/s | load average {load_start:.2f} at the start | "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} alternating repeats",
        flush=True,
    )
    print(f"# {vs_trl.MFU_HEADER}", flush=True)
    print(f"# a cell is FLAGGED when other work kept more than {args.max_other} cores busy before or during it"
          f"{' (--strict: refused / withheld)' if args.strict else ''}", flush=True)  # fmt: skip
    if load_start > args.max_other:
        print(f"# WARNING: the load average is {load_start:.2f} before anything of ours runs: other work is here",
              flush=True)  # fmt: skip

    cells, skipped = [], []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(cell: dict[str, Any]) -> None:
        cells.append(cell)
        with open(out, "a") as f:
            f.write(json.dumps(cell) + "\n")
        print(table_row(cell), flush=True)

    for name, length in product(shapes, lengths):
        shape = shape_of(name)
        grid = list(product(batches, cases))
        if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
            skipped += [(name, b, length, c) for b, c in grid]
            continue
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            info = vs_trl.prepare(workdir, cell_args(name, batches[0], length, ",".join(cases), args))
            print(f"## {name} ({shape.params() / 1e6:.1f}M parameters), length {length}: {info['rows']} HH pairs, "
                  f"{info['sft_rows']} SFT rows", flush=True)  # fmt: skip
            for batch, case in grid:
                cell: dict[str, Any] = {"shape": name, "batch": batch, "length": length, "case": case,
                                        "threads": args.threads, "cpus": cpus, "time": time.strftime("%F %T"),
                                        "matmul_flops": peak_start}  # fmt: skip
                if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
                    skipped.append((name, batch, length, case))
                    continue
                need = needed_bytes(shape, case)
                if need > 0.8 * available_bytes():
                    cell.update(status="skipped", reason=f"needs >= {need / 2**30:.1f} GiB per side, "
                                f"{available_bytes() / 2**30:.1f} GiB available")  # fmt: skip
                    record(cell)
                    continue
                cell["load_before"], cell["other_before"] = load_average(), other_cores()
                waited = 0.0
                while args.strict and cell["other_before"] > args.max_other and waited < args.settle:
                    time.sleep(5)
                    waited += 7
                    cell["load_before"], cell["other_before"] = load_average(), other_cores()
                if args.strict and cell["other_before"] > args.max_other:
                    cell.update(status="refused", reason=f"other work kept {cell['other_before']:.2f} cores busy")
                    record(cell)
                    continue
                busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
                try:
                    result = vs_trl.run_case(case, workdir, cell_args(name, batch, length, case, args), peak_start)
                    cell.update(status="ok", result=result)
                except RuntimeError as error:  # a worker failed (out of memory, ...): say so, go on
                    cell.update(status="failed", reason=str(error).strip().splitlines()[-1][:200])
                wall = time.perf_counter() - start
                cell["seconds"] = wall
                cell["other_during"] = max(0.0, (busy_seconds() - busy - (own_seconds() - own)) / wall)
                cell["load_after"] = load_average()
                if cell["status"] == "ok" and max(cell["other_before"], cell["other_during"]) > args.max_other:
                    cell["status"] = "flagged"
                    if args.strict:
                        cell.update(status="withheld", reason=f"other work kept {cell['other_during']:.2f} cores "
                                    "busy during it", withheld=cell.pop("result"))  # fmt: skip
                record(cell)

    peak_end = vs_trl.matmul_flops(args.threads)
    peak = max(peak_start, peak_end)
    for cell in cells:  # MFU against the better of the two measurements of the machine's rate
        if "result" in cell:
            cell["result"]["mfu"] = {k: [m * peak_start / peak for m in v] for k, v in cell["result"]["mfu"].items()}
            performed_mfu(cell, peak)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"Command: `python benchmarks/matrix.py {' '.join(sys.argv[1:])}`; {time.strftime('%F')}; trl "
        f"{trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; {args.threads} "
        f"threads on CPUs {cpus}; fp32 matmul {peak_start / 1e9:.1f} GFLOP/s at the start, {peak_end / 1e9:.1f} at "
        f"the end (MFU uses {peak / 1e9:.1f}); {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} "
        f"alternating repeats; {minutes:.1f} minutes.",
        "",
        f"{vs_trl.MFU_HEADER}. Other cores: the cores that work other than this benchmark kept busy, in a 2 s sample "
        f"before the cell and over the cell; FLAGGED above {args.max_other}.",
        "",
        TABLE_HEAD,
        *(table_row(cell) for cell in cells),
    ]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)} cells, --max-minutes {args.max_minutes} reached): "
                  + ", ".join(f"{n}/b{b}/L{n_}/{c}" for n, b, n_, c in skipped)]  # fmt: skip
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def report(args: argparse.Namespace) -> None:
    """``--report``: the table of the cells in a JSON lines file, MFU against the best matmul rate they recorded."""
    with open(args.report) as f:
        cells = [json.loads(line) for line in f if line.strip()]
    peak = max(cell["matmul_flops"] for cell in cells)
    for cell in cells:
        performed_mfu(cell, peak)
    times = sorted(cell["time"] for cell in cells)
    lines = [
        f"Cells of `{args.report}` ({len(cells)}, started {times[0]} to {times[-1]}); table: `python "
        f"benchmarks/matrix.py {' '.join(sys.argv[1:])}`; MFU against the best fp32 matmul rate measured at their "
        f"start, {peak / 1e9:.1f} GFLOP/s.",
        "",
        f"{vs_trl.MFU_HEADER}. Other cores: the cores that work other than this benchmark kept busy, in a 2 s sample "
        f"before the cell and over the cell; FLAGGED above {args.max_other}.",
        "",
        TABLE_HEAD,
        *(table_row(cell) for cell in cells),
    ]
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
