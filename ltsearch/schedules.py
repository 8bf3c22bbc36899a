"""Learning-rate schedules, evaluated per optimisation step: cosine to 0, or a step decay at epoch milestones.

Both start with an optional linear warm-up over the first `warmup` steps. A step is 0-based; an epoch
milestone m means "from epoch m + 1 on" (1-based), i.e. after m full epochs, as in the LDAM-DRW code.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

__all__ = ["cosine_lr", "lr_schedule", "step_lr"]


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `base` to 0 over the remaining steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_lr(step: int, steps_per_epoch: int, milestones: Sequence[int], gamma: float, warmup: int,
            base: float) -> float:
    """`base * gamma^k`, k the number of epoch `milestones` (increasing) already passed: gamma applies at
    each one, so milestones [160, 180] with gamma 0.01 give base, base * 1e-2, base * 1e-4. Times the linear
    warm-up factor (step + 1) / warmup during the first `warmup` steps."""
    passed = bisect.bisect_right(milestones, step // steps_per_epoch)
    lr = base * gamma ** passed
    return lr * (step + 1) / warmup if step < warmup else lr


def lr_schedule(kind: str, base: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                milestones: Sequence[int] = (), gamma: float = 1.0) -> Callable[[int], float]:
    """The learning rate at each step of a stage of `epochs` epochs: `kind` is "cosine" or "step"."""
    warmup = warmup_epochs * steps_per_epoch
    if kind == "cosine":
        total = epochs * steps_per_epoch
        return lambda step: cosine_lr(step, total, warmup, base)
    if kind == "step":
        return lambda step: step_lr(step, steps_per_epoch, milestones, gamma, warmup, base)
    raise ValueError(f"unknown learning-rate schedule {kind!r}; expected 'cosine' or 'step'")
