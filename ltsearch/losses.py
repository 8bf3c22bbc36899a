"""Losses for long-tailed training, registered in `LOSSES` and built by `build_loss`.

The class-balanced losses follow Cui et al. (CVPR 2019) as used by the weight-balancing code:
per-class weights from the effective number of samples, normalised to sum to the number of classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "build_loss", "class_balanced_weights"]


def class_balanced_weights(class_counts, beta: float) -> Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised so the weights sum to the number of classes.
    A class with no training image gets weight 0 (it never appears as a target)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if beta == 0:
        weights = torch.ones_like(counts)
    else:
        effective = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)
        weights = torch.where(counts > 0, (1.0 - beta) / effective.clamp_min(1e-300), 0.0)
    return (weights / weights.sum() * len(counts)).float()


class CrossEntropy(nn.Module):
    def __init__(self, class_counts, beta: float = 0.0, gamma: float = 0.0):
        super().__init__()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target)


class _ClassBalanced(nn.Module):
    def __init__(self, class_counts, beta: float = 0.9999, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("class_weights", class_balanced_weights(class_counts, beta))
        self.gamma = gamma


class ClassBalancedCE(_ClassBalanced):
    """Cross-entropy weighted by class-balanced weights (normalised by the summed sample weights)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.class_weights)


class ClassBalancedSoftmaxBCE(_ClassBalanced):
    """The weight-balancing code's "softmax" CB loss: binary cross-entropy between the softmax
    probabilities and the one-hot target, each sample weighted by its class weight (mean over B x C)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        one_hot = F.one_hot(target, logits.shape[1]).float()
        sample_weight = self.class_weights[target].unsqueeze(1).expand_as(one_hot)
        probs = logits.float().softmax(dim=1)
        return F.binary_cross_entropy(probs, one_hot, weight=sample_weight)


class ClassBalancedFocal(_ClassBalanced):
    """Sigmoid focal loss with class-balanced weights, as in Cui et al.'s code (sum / number of samples)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        one_hot = F.one_hot(target, logits.shape[1]).float()
        bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        # (1 - p_t)^gamma written in log space for stability, exactly as the reference implementation
        modulator = torch.exp(-self.gamma * one_hot * logits - self.gamma * F.softplus(-logits))
        weighted = self.class_weights[target].unsqueeze(1) * modulator * bce
        return weighted.sum() / one_hot.sum()


LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "cb_ce": ClassBalancedCE,
    "cb_softmax_bce": ClassBalancedSoftmaxBCE,
    "cb_focal": ClassBalancedFocal,
}


def build_loss(name: str, class_counts, beta: float = 0.9999, gamma: float = 0.0) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name](class_counts, beta=beta, gamma=gamma)
