"""Accuracy metrics for long-tailed evaluation: overall, per class, and per class-size group.

Counts are kept as per-class (correct, total) vectors so that several data-parallel ranks can sum them
before any ratio is taken.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .data import shot_groups, tercile_groups

__all__ = ["accuracy_metrics", "class_groups", "per_class_counts"]


def per_class_counts(pred: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(correct, total) per class, as float64 vectors of length `num_classes`."""
    total = torch.bincount(target, minlength=num_classes).double()
    correct = torch.bincount(target[pred == target], minlength=num_classes).double()
    return correct, total


def class_groups(class_counts) -> dict[str, list[int]]:
    """Standard shot groups (many/medium/few) plus size terciles (head/middle/tail) of the train classes."""
    return {**shot_groups(class_counts), **tercile_groups(class_counts)}


def accuracy_metrics(correct: Tensor, total: Tensor, groups: dict[str, list[int]], prefix: str) -> dict:
    """Percent accuracy: `{prefix}_acc`, `{prefix}_acc_{group}` (None when the group has no class or no
    image: missing, not 0) and `{prefix}_per_class_acc` (None for classes without images)."""
    correct, total = correct.double().cpu(), total.double().cpu()
    out = {f"{prefix}_acc": 100.0 * correct.sum().item() / max(total.sum().item(), 1.0)}
    for name, classes in groups.items():
        n = total[classes].sum().item() if classes else 0.0
        out[f"{prefix}_acc_{name}"] = 100.0 * correct[classes].sum().item() / n if n else None
    out[f"{prefix}_per_class_acc"] = [
        100.0 * c / t if t else None for c, t in zip(correct.tolist(), total.tolist())]
    return out
