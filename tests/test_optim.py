"""The default optimizer and learning-rate schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lit_align.optim import WarmupCosineLR, default_optimizer


def test_default_optimizer_is_adamw_with_instructgpt_betas():
    optimizer = default_optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_default_optimizer_uses_the_fused_kernel_where_every_parameter_allows_it():
    """CPU fp32 parameters get the fused AdamW kernel (Hugging Face's and so TRL's default), and three steps of it
    equal torch's per-parameter loop to rounding; a parameter the kernel does not take (an integer tensor) falls back
    to torch's own choice instead of failing."""
    fused, loop = (torch.nn.Parameter(torch.arange(4.0)) for _ in range(2))
    optimizer = default_optimizer([fused])
    assert optimizer.defaults["fused"] is True
    reference = torch.optim.AdamW([loop], betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    for opt, param in ((optimizer, fused), (reference, loop)):
        for step in range(3):
            param.grad = torch.full_like(param, step + 1.0) * torch.tensor([1.0, -1.0, 0.5, 2.0])
            opt.step()
    torch.testing.assert_close(fused, loop)
    integer = torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert not default_optimizer([integer]).defaults["fused"]


def test_warmup_cosine_by_hand():
    """10 steps, 2 warm-up: factors 1/3, 2/3, then cosine from 1 down to 0.1 over the remaining 8 steps."""
    schedule = WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 10, 0.1)
    assert schedule.factor(0) == pytest.approx(1 / 3) and schedule.factor(1) == pytest.approx(2 / 3)
    assert schedule.factor(2) == pytest.approx(1.0)
    assert schedule.factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.factor(10) == pytest.approx(0.1)


def test_total_steps_filled_in_later_and_state_loads_weights_only():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosineLR(optimizer, warmup_steps=0.5)
    assert optimizer.param_groups[0]["lr"] == 2.0  # no run length yet: constant
    schedule.set_total_steps(4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 / 3)  # step 0 of a 2-step warm-up
    for _ in range(3):
        optimizer.step()
        schedule.step()
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0))
    fresh.load_state_dict(state)
    assert fresh.total_steps == 4 and fresh.last_epoch == 3 and fresh.get_last_lr() == schedule.get_last_lr()


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", False)])
def test_modules_take_the_fused_optimizer_except_under_lightnings_amp_plugin(precision, fused):
    """A module's default optimizer is fused under 32-true, and not under bf16-mixed: Lightning's AMP plugin refuses
    gradient clipping with an optimizer that unscales gradients itself (a real CPU Trainer attached, the tiny SFT
    module's parameters)."""
    import lightning as L

    from lit_align import SFTModule

    module = SFTModule(model="tiny")
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused
