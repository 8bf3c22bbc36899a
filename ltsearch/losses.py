"""Losses for long-tailed training, registered in `LOSSES` and built by `build_loss` (from a stage's config
section: `ltsearch.build.loss_from_config`).

The class-balanced losses follow Cui et al. (CVPR 2019) as used by the weight-balancing code:
per-class weights from the effective number of samples, normalised to sum to the number of classes.
The logit-adjusting losses change only the training loss; the model's plain logits are what is evaluated:
  balanced_softmax   cross-entropy on logits + log n_c (Ren et al., NeurIPS 2020)
  logit_adjusted     cross-entropy on logits + tau * log pi_c, pi_c = n_c / N (Menon et al., ICLR 2021)
  ldam               cross-entropy on s * (logits - m_y at the true class), m_c proportional to n_c^(-1/4),
                     the largest m_c = max margin (Cao et al., NeurIPS 2019; kaidic/LDAM-DRW `LDAMLoss`)
The cross-entropy family (`ce` and these three) takes an optional per-class `weight` at call time, which is
how deferred re-weighting (`DeferredReweighting`, LDAM-DRW's schedule) switches class-balanced weights on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .catalog import REWEIGHTABLE

__all__ = [
    "LOSSES", "REWEIGHTABLE", "DeferredReweighting", "build_loss", "class_balanced_weights", "ldam_margins",
]


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


def _log_prior(class_counts, tau: float) -> Tensor:
    """tau * log(n_c / N) per class; -inf for a class without images (it never is a target), 0 when tau is 0."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    log_prior = torch.log(counts.clamp_min(1) / counts.sum())
    absent = torch.tensor(float("-inf") if tau > 0 else 0.0, dtype=torch.float64)
    return torch.where(counts > 0, tau * log_prior, absent).float()


def ldam_margins(class_counts, max_margin: float) -> Tensor:
    """m_c = K / n_c^(1/4) with K such that the largest margin (the rarest class's) is `max_margin`; 0 for a
    class without images (it never is a target)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    raw = torch.where(counts > 0, counts.clamp_min(1) ** -0.25, 0.0)
    return (raw * (max_margin / raw.max())).float()


class CrossEntropy(nn.Module):
    """Cross-entropy, optionally with label smoothing (the target gets 1 - eps + eps / C, every class eps / C)."""

    def __init__(self, class_counts, *, label_smoothing: float = 0.0, **_):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.label_smoothing)


class _LogitAdjusted(nn.Module):
    """Cross-entropy on logits plus a fixed per-class offset (the buffer `offset`)."""

    def __init__(self, offset: Tensor):
        super().__init__()
        self.register_buffer("offset", offset)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits.float() + self.offset, target, weight=weight)


class BalancedSoftmax(_LogitAdjusted):
    """Balanced softmax: -log(n_y e^{z_y} / sum_j n_j e^{z_j}), i.e. cross-entropy on z + log n."""

    def __init__(self, class_counts, **_):
        super().__init__(_log_prior(class_counts, 1.0))  # log n_c - log N: the constant cancels in the softmax


class LogitAdjusted(_LogitAdjusted):
    """Logit-adjusted loss: cross-entropy on z + tau * log pi, pi_c = n_c / N (tau 1 is balanced softmax)."""

    def __init__(self, class_counts, *, logit_adjust_tau: float = 1.0, **_):
        super().__init__(_log_prior(class_counts, logit_adjust_tau))


class LDAM(nn.Module):
    """Label-distribution-aware margin loss: cross-entropy on s * (z - m_y e_y), the true class's logit lowered
    by its margin. With a cosine classifier of scale 1 (LDAM's `NormedLinear`) z is a cosine and s = 30."""

    def __init__(self, class_counts, *, ldam_max_margin: float = 0.5, ldam_scale: float = 30.0, **_):
        super().__init__()
        self.register_buffer("margins", ldam_margins(class_counts, ldam_max_margin))
        self.scale = ldam_scale

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        logits = logits.float()
        margin = F.one_hot(target, logits.shape[1]).float() * self.margins[target].unsqueeze(1)
        return F.cross_entropy(self.scale * (logits - margin), target, weight=weight)


class _ClassBalanced(nn.Module):
    def __init__(self, class_counts, *, beta: float = 0.9999, gamma: float = 0.0, **_):
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
    "balanced_softmax": BalancedSoftmax,
    "logit_adjusted": LogitAdjusted,
    "ldam": LDAM,
    "cb_ce": ClassBalancedCE,
    "cb_softmax_bce": ClassBalancedSoftmaxBCE,
    "cb_focal": ClassBalancedFocal,
}  # the names of `catalog.LOSS_NAMES`, which a config is validated against
# REWEIGHTABLE (from the catalog, for config validation): the losses that take a per-class `weight` when called,
# so deferred re-weighting applies to them (the cb_* losses carry their class-balanced weights from the start)


def build_loss(name: str, class_counts, beta: float = 0.9999, gamma: float = 0.0, *,
               label_smoothing: float = 0.0, logit_adjust_tau: float = 1.0, ldam_max_margin: float = 0.5,
               ldam_scale: float = 30.0) -> nn.Module:
    """`LOSSES[name]` for `class_counts`; each loss takes the parameters it uses (beta and gamma: the cb_*
    losses; label_smoothing: ce; logit_adjust_tau: logit_adjusted; ldam_*: ldam) and ignores the others."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name](class_counts, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
                        logit_adjust_tau=logit_adjust_tau, ldam_max_margin=ldam_max_margin, ldam_scale=ldam_scale)


class DeferredReweighting(nn.Module):
    """Deferred re-weighting (DRW, Cao et al. 2019): `loss` unweighted before stage epoch `start` (0-based),
    weighted by `weights` (class-balanced) from it on, as kaidic/LDAM-DRW switches at `epoch // 160`.
    The trainer calls `set_epoch` before every epoch, so a resumed run picks the right weights."""

    def __init__(self, loss: nn.Module, weights: Tensor, start: int):
        super().__init__()
        self.loss, self.start = loss, start
        self.register_buffer("weights", weights)
        self.active = False

    def set_epoch(self, epoch: int) -> None:
        self.active = epoch >= self.start

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss(logits, target, weight=self.weights if self.active else None)

