"""Where lit_align's training step spends its time, per method, at a given model shape (default: SmolLM2-135M's,
batch 8, length 1,024, the settings of ``matrix.py``'s headline cell).

    python benchmarks/breakdown.py                                    # sft, reward, dpo, grpo at the 135M shape
    python benchmarks/breakdown.py --shape tiny --batch 4 --length 256 --cases sft,dpo   # seconds

Each case runs, in a fresh process, ``vs_trl.py``'s lit_align worker (the same model directory, rows, batch and
threads) for ``--warmup`` steps, then one step under ``torch.profiler`` (CPU); its peak memory is the worker's (peak
RSS from the start of training minus the RSS then, warm-up included). Two views of the profiled step:

* **phases**, from Lightning's hooks: data (the loader's fetch and collation, before ``on_train_batch_start``),
  forward (up to each ``on_before_backward``: the model's forward, the loss, for GRPO the rollout), backward (to
  ``on_after_backward``), and the rest (gradient clipping, the optimizer step, logging);
* **work**, from the profiler's operator events: the optimizer (``Optimizer.step`` and ``zero_grad``); the
  unembedding and log-probs (``linear_log_probs``, forward and its recomputing backward, labelled by this script);
  for GRPO, sampling (``RolloutStage.sample``: Hugging Face ``generate``, labelled by this script); attention
  (``scaled_dot_product_attention`` and its backward); the linear layers' matmuls (self time of ``mm``, ``addmm``,
  ``bmm``); every other operator (elementwise, norms, embedding, copies); and **overhead**: the step's wall time
  in which no operator ran (Python, Lightning, autograd bookkeeping).

The profiler adds a few microseconds per operator; at this shape a step runs a few thousand operators in tens of
seconds, so its cost is far below the figures' resolution (the step's wall time is printed beside the unprofiled
step time of the warm-up for comparison).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix
import vs_trl

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
WORK = ["optimizer (incl. clipping)", "unembedding + log-probs", "sampling", "attention", "linear-layer matmuls",
        "other operators", "overhead (no operator running)"]  # fmt: skip
LOGPS_LABEL, SAMPLE_LABEL = "lit_align: linear_log_probs", "lit_align: rollout sampling"
CLOSURE_LABEL = "lightning: training step closure"  # forward + backward, run inside ``Optimizer.step``


def label(function: Any, name: str) -> Any:
    """``function`` inside a profiler range called ``name``."""
    import torch

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return function(*args, **kwargs)

    return wrapped


def category(name: str) -> str | None:
    """The category an event counts in as a whole (its children not looked at), or ``None`` to look inside."""
    if name == LOGPS_LABEL or "_LinearLogProbsBackward" in name:
        return "unembedding + log-probs"
    if name == SAMPLE_LABEL:
        return "sampling"
    if "scaled_dot_product" in name.lower() or "ScaledDotProduct" in name:
        return "attention"
    return None


def work_split(events: Any, wall: float) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of the profiled window in each of ``WORK``: labelled ranges whole, then operators' self time. Under
    automatic optimization Lightning runs the forward and backward as a closure inside ``Optimizer.step``: what that
    event runs outside the closure (gradient clipping, the update) is the optimizer's. Also the five other operators
    that took longest."""
    seconds = dict.fromkeys(WORK, 0.0)
    others: dict[str, float] = {}

    def visit(event: Any, in_optimizer: bool) -> None:
        name = event.name
        if name == CLOSURE_LABEL:
            in_optimizer = False
        elif name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
            in_optimizer = True
        elif (kind := category(name)) is not None:
            seconds[kind] += event.cpu_time_total / 1e6
            return
        if in_optimizer and name != CLOSURE_LABEL:
            seconds["optimizer (incl. clipping)"] += event.self_cpu_time_total / 1e6
        elif name.startswith("aten::"):
            kind = "linear-layer matmuls" if name in MATMUL_OPS else "other operators"
            seconds[kind] += event.self_cpu_time_total / 1e6
            if kind == "other operators":
                others[name] = others.get(name, 0.0) + event.self_cpu_time_total / 1e6
        for child in event.cpu_children:
            visit(child, in_optimizer)

    for event in events:
        if event.cpu_parent is None:
            visit(event, False)
    seconds["overhead (no operator running)"] = max(0.0, wall - sum(seconds.values()))
    top = sorted(others.items(), key=lambda item: -item[1])[:5]
    return seconds, {name: round(value, 3) for name, value in top}


def profile_case(case: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One lit_align run of ``case``: ``--warmup`` steps, then one profiled step; its phases and work split."""
    import lightning as L
    import torch

    import lit_align.forward
    import lit_align.rollout.stage

    lit_align.forward.linear_log_probs = label(lit_align.forward.linear_log_probs, LOGPS_LABEL)
    stage = lit_align.rollout.stage.RolloutStage
    stage.sample = label(stage.sample, SAMPLE_LABEL)
    from lightning.pytorch.loops.optimization.automatic import Closure

    Closure.__call__ = label(Closure.__call__, CLOSURE_LABEL)
    marks: list[tuple[str, float]] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Breakdown(L.Callback):
        def mark(self, what: str) -> None:
            if profiling:
                marks.append((what, time.perf_counter()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.mark("start")

        def on_before_backward(self, *_):
            self.mark("before_backward")

        def on_after_backward(self, *_):
            self.mark("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nonlocal profiling
            if profiling:
                self.mark("end")
                profiler.stop()
                profiling = False
            elif batch_idx == args.warmup - 1:  # the profiled step's data fetch comes next
                profiling = True
                marks.append(("previous_end", time.perf_counter()))
                profiler.start()

    profiling = False
    args.steps, args.batch_size, args.grpo_prompts = 1, args.batch, args.batch
    figures = vs_trl.run_lit_align(case, workdir, args, callbacks=[Breakdown()])
    times = dict(marks[:1] + marks[-1:])
    wall = times["end"] - times["previous_end"]
    phases = {
        "data": marks[1][1] - marks[0][1],
        "forward": 0.0,
        "backward": 0.0,
        "rest": 0.0,
    }
    for (what, t0), (_, t1) in zip(marks[1:], marks[2:]):
        phases["forward" if what in ("start", "after_backward") else "backward" if what == "before_backward" else
               "rest"] += t1 - t0  # fmt: skip
    if marks[-2][0] == "after_backward":  # from the last backward to the step's end: clipping, optimizer, logging
        phases["forward"] -= marks[-1][1] - marks[-2][1]
        phases["rest"] += marks[-1][1] - marks[-2][1]
    work, top_other = work_split(profiler.events(), wall)
    return dict(case=case, wall=wall, phases=phases, work=work, top_other_operators=top_other,
                useful_tokens=figures["tokens_per_step"], peak_rss_mb=figures["peak_rss_mb"])  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    def share(seconds: float, wall: float) -> str:
        return f"{seconds:.{1 if wall >= 10 else 2}f} s ({seconds / wall:.0%})"

    lines = [
        "| case | step | peak memory | data | forward | backward | clip + optimizer + logging |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {vs_trl.CASES[r['case']]} | {r['wall']:.1f} s | {r['peak_rss_mb']:,.0f} MB | "
            + " | ".join(share(r["phases"][k], r["wall"]) for k in ("data", "forward", "backward", "rest"))
            + " |"
            for r in results
        ),
        "",
        "| case | " + " | ".join(WORK) + " |",
        "| --- " * (len(WORK) + 1) + "|",
        *(
            f"| {vs_trl.CASES[r['case']]} | " + " | ".join(share(r["work"][k], r["wall"]) for k in WORK) + " |"
            for r in results
        ),
        "",
        "The other operators that took longest: "
        + "; ".join(
            f"{vs_trl.CASES[r['case']]}: "
            + ", ".join(f"{k.removeprefix('aten::')} {v:.2f} s" for k, v in r["top_other_operators"].items())
            for r in results
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", help=f"among {', '.join(matrix.SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--cases", default="sft,reward,dpo,grpo", help="among sft, reward, dpo, dpo_precomputed, grpo")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="also write the JSON figures here")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # a worker: one case, prepared rows, JSON out
    args = parser.parse_args()
    if args.shape not in matrix.SHAPES:
        parser.error(f"--shape: unknown shape {args.shape!r}; known: {', '.join(matrix.SHAPES)}")
    args.warmup = max(args.warmup, 1)  # the profiler starts at the end of a warm-up step
    args.repeats, args.steps, args.group_size, args.completion_length = 1, 1, 8, 32

    import torch

    torch.set_num_threads(args.threads)
    if args.workdir:
        run_args = matrix.cell_args(args.shape, args.batch, args.length, args.cases, args)
        run_args.batch = args.batch
        print(json.dumps(profile_case(args.cases, Path(args.workdir), run_args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        vs_trl.prepare(Path(tmp), matrix.cell_args(args.shape, args.batch, args.length, args.cases, args))
        for case in args.cases.split(","):  # each in a fresh process: its memory and allocator its own
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--cases", case, "--workdir", tmp],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"breakdown of {case} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n`python benchmarks/breakdown.py {' '.join(sys.argv[1:])}` ({args.shape}, batch {args.batch}, "
          f"length {args.length}, {torch.get_num_threads()} threads, fp32, one profiled step after {args.warmup} "
          "warm-up, each case in a fresh process)\n")  # fmt: skip
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
