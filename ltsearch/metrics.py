"""Accuracy metrics for long-tailed evaluation: overall, per class, and per class-size group.

Counts are kept as per-class (correct, total) vectors so that several data-parallel ranks can sum them
before any ratio is taken.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .data import shot_groups, tercile_groups
from .models import ClassScale
from .regularizers import row_norms, tau_normalize
from .selection import is_missing  # re-exported: it lived here (selection.py imports no torch)

__all__ = [
    "accuracy_metrics", "class_groups", "classifier_metrics", "feature_counts", "is_missing", "metrics_from_counts",
    "per_class_counts",
]


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


@torch.no_grad()
def feature_counts(model, feats: torch.Tensor, y: torch.Tensor, tau_weight: torch.Tensor,
                   per_image: list | None = None) -> torch.Tensor:
    """Per-class rows (correct, total, tau-normalised correct, summed CE loss) of one batch of features.
    `per_image`, when given, gets the batch's per-image correctness appended: a (2, batch) bool CPU tensor,
    rows the classifier and its tau-normalised copy."""
    num_classes = model.classifier.out_features
    logits = model.logits_from_features(feats)
    tau_logits = model.logits_from_features(feats, weight=tau_weight)
    pred, tau_pred = logits.argmax(1), tau_logits.argmax(1)
    correct, total = per_class_counts(pred, y, num_classes)
    tau_correct, _ = per_class_counts(tau_pred, y, num_classes)
    if per_image is not None:
        per_image.append(torch.stack([pred == y, tau_pred == y]).cpu())
    loss = torch.zeros(num_classes, dtype=torch.float64, device=feats.device).index_add_(
        0, y, nn.functional.cross_entropy(logits, y, reduction="none").double())
    return torch.stack([correct, total, tau_correct, loss])


def metrics_from_counts(counts: torch.Tensor, groups: dict[str, list[int]], split: str) -> dict:
    """`{split}_loss`, `{split}_acc*` and `tau_{split}_acc*` from summed `feature_counts` rows."""
    correct, total, tau_correct, loss = counts
    return {f"{split}_loss": loss.sum().item() / max(total.sum().item(), 1.0),
            **accuracy_metrics(correct, total, groups, split),
            **accuracy_metrics(tau_correct, total, groups, f"tau_{split}")}


@torch.no_grad()
def classifier_metrics(model, splits: dict[str, Iterable[tuple[Tensor, Tensor]]], tau: float,
                       groups: dict[str, list[int]], reduce: Callable[[Tensor], Tensor] | None = None,
                       per_image: Iterable[str] = ()) -> dict:
    """`metrics_from_counts` of every split, from its batches of (features, labels), for `model`'s classifier
    and its tau-normalised copy, plus `classifier_norms`. `reduce` sums the counts across data-parallel ranks.
    For each split named in `per_image`, `{split}_correct` holds its per-image correctness in batch order, a
    (2, images) bool CPU tensor (the classifier, its tau-normalised copy; this rank's images only), for the
    paired tie test (`ltsearch.selection`); callers take it out before reporting.

    `classifier_norms` are the norms of the rows that classify: after an LWS stage 2 (a `ClassScale` s behind the
    frozen classifier, logit c times s_c) the scaled rows' |s_c| * ||w_c||, not the frozen ||w_c||."""
    weight = model.classifier.weight
    tau_weight = tau_normalize(weight, tau)
    out = {}
    keep = set(per_image)
    for split, batches in splits.items():
        images: list | None = [] if split in keep else None
        counts = sum(feature_counts(model, feats, y, tau_weight, images) for feats, y in batches)
        out.update(metrics_from_counts(counts if reduce is None else reduce(counts), groups, split))
        if images is not None:
            out[f"{split}_correct"] = torch.cat(images, 1) if images else torch.zeros(2, 0, dtype=torch.bool)
    norms = row_norms(weight)
    class_scale = getattr(model, "logit_bn", None)
    if isinstance(class_scale, ClassScale):
        norms = norms * class_scale.scale.detach().abs().to(norms.dtype)
    out["classifier_norms"] = norms.tolist()
    return out

