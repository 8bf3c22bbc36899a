"""Tests of ltsearch.schedules: cosine and step learning rates, with linear warm-up, at hand-worked steps."""
from __future__ import annotations

import pytest

from ltsearch.schedules import cosine_lr, lr_schedule, step_lr


def test_cosine_hand_values():
    # 10 steps from 0.1: cos(pi * s / 10) at s = 0, 5, 10
    assert cosine_lr(0, 10, 0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(5, 10, 0, 0.1) == pytest.approx(0.05)
    assert cosine_lr(10, 10, 0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_cosine_warmup_is_linear_then_cosine_over_the_rest():
    # warm-up 2 steps: 0.05, 0.1; then the cosine runs over the remaining 8 steps
    assert [cosine_lr(s, 10, 2, 0.1) for s in (0, 1, 2)] == pytest.approx([0.05, 0.1, 0.1])
    assert cosine_lr(6, 10, 2, 0.1) == pytest.approx(0.05)  # halfway through the 8 cosine steps


def test_step_lr_applies_gamma_at_each_milestone_cumulatively():
    # 10 steps per epoch; milestones [160, 180] with gamma 0.01: 0.1 -> 0.001 -> 0.00001
    lr = [step_lr(s, 10, [160, 180], 0.01, 0, 0.1) for s in (0, 1599, 1600, 1799, 1800, 1999)]
    assert lr == pytest.approx([0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5], rel=1e-12)


def test_step_lr_warmup_is_linear_per_step():
    # warm-up of 5 epochs x 10 steps = 50 steps: (s + 1) / 50 of the base
    lr = [step_lr(s, 10, [160, 180], 0.01, 50, 0.1) for s in (0, 24, 49, 50)]
    assert lr == pytest.approx([0.002, 0.05, 0.1, 0.1])


def test_step_schedule_matches_the_ldam_drw_reference_per_epoch():
    """kaidic/LDAM-DRW `adjust_learning_rate` (epoch 0-based, set once per epoch): 5 warm-up epochs, then x0.01
    after epoch 160 and x0.0001 after epoch 180. With one step per epoch the step schedule gives the same lr."""
    def reference(epoch: int, base: float = 0.1) -> float:
        epoch += 1
        if epoch <= 5:
            return base * epoch / 5
        if epoch > 180:
            return base * 0.0001
        if epoch > 160:
            return base * 0.01
        return base

    lr = lr_schedule("step", 0.1, 200, 1, warmup_epochs=5, milestones=[160, 180], gamma=0.01)
    assert [lr(e) for e in range(200)] == pytest.approx([reference(e) for e in range(200)], rel=1e-12)


def test_lr_schedule_builds_either_schedule_per_step():
    cosine = lr_schedule("cosine", 0.1, 2, 5, warmup_epochs=1)
    assert [cosine(s) for s in range(10)] == [cosine_lr(s, 10, 5, 0.1) for s in range(10)]
    step = lr_schedule("step", 0.1, 4, 5, milestones=[2, 3], gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 14, 15, 19)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(ValueError, match="'linear'"):
        lr_schedule("linear", 0.1, 2, 5)
