"""Optimizer and learning-rate schedule defaults (InstructGPT: Adam with betas 0.9/0.95, cosine decay)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

INSTRUCTGPT_BETAS = (0.9, 0.95)


def default_optimizer(params: Iterable[torch.nn.Parameter], fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with InstructGPT's betas (0.9, 0.95) and no weight decay; the module sets the learning rate.

    ``fused=None`` takes the fused kernel (one pass over each parameter for the whole update; Hugging Face's default
    since torch 2.8) where every parameter allows it (a floating-point tensor on a device with the kernel: CPU,
    CUDA, ...), else torch's own choice; ``False`` never. On a CPU it is the difference between 0.33 s and 0.05 s a
    step at 135M parameters (``benchmarks/adamw.py``); the update is the same up to rounding. The modules pass
    ``False`` under Lightning's AMP plugin (``16-mixed``, ``bf16-mixed``), which refuses gradient clipping with an
    optimizer that unscales gradients itself, as the fused one does."""
    params = list(params)
    use_fused = fused_supported(params) if fused is None else fused
    return torch.optim.AdamW(params, betas=INSTRUCTGPT_BETAS, weight_decay=0.0, fused=use_fused or None)


def fused_supported(params: Iterable[Any]) -> bool:
    """Whether torch's fused optimizer kernels take every tensor of ``params`` (tensors or param-group dicts):
    floating point, on a device type that has them. ``False`` if this torch does not say."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: a torch without it gets torch's own choice
        return False
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    return all(p.is_floating_point() and p.device.type in devices for p in tensors)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_lr_ratio`` times it.

    Stepped once per optimizer step. A state dict of plain numbers (it loads with ``weights_only=True``).

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_steps: warm-up length: a step count, or a fraction of ``total_steps`` if below 1.
        total_steps: steps of the whole run; ``None`` lets the module fill in the Trainer's estimate.
        min_lr_ratio: final learning rate as a fraction of the base (InstructGPT decayed to 10%).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0.03,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in the run length once it is known, and re-apply the step-0 learning rate with it."""
        self.total_steps = int(total_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
        total = self.total_steps
        if total is None or total <= 0:
            return 1.0
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
