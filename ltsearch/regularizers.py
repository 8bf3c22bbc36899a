"""Weight-balancing regularisers: MaxNorm projection, tau-normalisation and weight-decay groups."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["MaxNorm", "maxnorm_", "relative_max_norm", "row_norms", "tau_normalize", "weight_decay_groups"]


def row_norms(weight: Tensor) -> Tensor:
    """L2 norm of each classifier row (one per class)."""
    return weight.detach().flatten(1).norm(dim=1)


def tau_normalize(weight: Tensor, tau: float) -> Tensor:
    """New tensor with each row w_c divided by ||w_c||^tau (tau=0: unchanged, tau=1: unit rows)."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    return weight / norms.pow(tau).view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def maxnorm_(weight: Tensor, max_norm: float) -> Tensor:
    """Project in place every row whose L2 norm exceeds `max_norm` back onto the ball of that radius."""
    norms = weight.flatten(1).norm(dim=1)
    scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    return weight


def relative_max_norm(weight: Tensor, thresh: float) -> float:
    """The paper code's MaxNorm radius: min + thresh * (max - min) of the row norms."""
    norms = row_norms(weight)
    low, high = norms.min().item(), norms.max().item()
    return low + thresh * (high - low)


@dataclass(frozen=True)
class MaxNorm:
    """MaxNorm on a classifier: the rows of `weight` are projected onto the ball of `radius` after every
    optimisation step or after every epoch (`every`)."""

    weight: Tensor
    radius: float
    every: Literal["step", "epoch"] = "step"

    def after(self, event: Literal["step", "epoch"]) -> None:
        """Called after each step and each epoch; projects when `event` is this MaxNorm's `every`."""
        if event == self.every:
            maxnorm_(self.weight, self.radius)


def weight_decay_groups(model: nn.Module, weight_decay: float, exempt_norm_bias: bool = False,
                        exempt: Sequence[nn.Parameter] = (), decay: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Optimiser parameter groups: weight decay on every trainable parameter by default (as in the paper);
    optionally none on biases and normalisation parameters (any parameter with fewer than 2 dims).
    Parameters in `exempt` are never decayed and those in `decay` always are, whatever `exempt_norm_bias`
    says: a parameter whose decay is its own setting (NBN's shared scale) goes in one of them."""
    exempt_ids, decay_ids = {id(p) for p in exempt}, {id(p) for p in decay}
    if exempt_ids & decay_ids:
        raise ValueError("a parameter cannot be both exempt from weight decay and always decayed")
    decayed, not_decayed = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in exempt_ids or (exempt_norm_bias and p.dim() < 2 and id(p) not in decay_ids):
            not_decayed.append(p)
        else:
            decayed.append(p)
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    return groups
