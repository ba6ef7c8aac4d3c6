"""benchmarks/breakdown.py's split of a profiled step into work categories, on a real torch.profiler trace of a
small optimizer step whose forward and backward run as a closure inside ``Optimizer.step`` (as Lightning's automatic
optimization runs them)."""

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_work_split_keeps_the_closure_out_of_the_optimizer_and_accounts_for_the_wall_time():
    breakdown = pytest.importorskip("breakdown")
    torch.manual_seed(0)
    model = nn.Linear(128, 128)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(256, 128)

    def closure():
        with torch.profiler.record_function(breakdown.CLOSURE_LABEL):
            optimizer.zero_grad()
            with torch.profiler.record_function(breakdown.LOGPS_LABEL):  # counted whole, as the log-prob head
                scores = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])
            loss = model(x).square().mean() + scores.mean()
            loss.backward()
            return loss

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        optimizer.step(closure)
        wall = time.perf_counter() - start
    seconds, top_other = breakdown.work_split(profiler.events(), wall)
    assert set(seconds) == set(breakdown.WORK)
    assert seconds["linear-layer matmuls"] > 0  # the closure's addmm / mm: not the optimizer's
    assert seconds["optimizer (incl. clipping)"] > 0  # AdamW's update, outside the closure
    assert seconds["unembedding + log-probs"] > 0 and seconds["attention"] == 0  # a labelled range counts whole
    assert seconds["sampling"] == 0
    assert sum(seconds.values()) == pytest.approx(wall, rel=0.05)  # overhead fills the rest of the wall time
    assert all(name.startswith("aten::") for name in top_other)
