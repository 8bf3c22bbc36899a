"""The optimisation loop every training path shares: both stages of the trainer (`train.py`), stage 2 on
cached features (`features.fit_classifier`) and the benchmarks that time the trainer's step.

A stage is described by a `StageSetup` (what it optimises, with which optimiser, loss, learning-rate
schedule and MaxNorm, how it sets train/eval modes and how it gets logits from a batch); `train_epoch` runs
one epoch of any setup. `classifier_setup` is stage 2's setup on features, used by the trainer and by
`fit_classifier` alike.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .build import loss_from_config
from .config import Stage2Config
from .models import LTClassifier
from .regularizers import MaxNorm, relative_max_norm, weight_decay_groups
from .schedules import lr_schedule

__all__ = ["StageSetup", "classifier_head", "classifier_setup", "sgd_step", "train_epoch"]


@dataclass(frozen=True)
class StageSetup:
    """One training stage: everything `train_epoch` needs."""

    module: nn.Module  # what is optimised: the whole model (stage 1) or classifier + logit BN (stage 2)
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module  # (float32 logits, targets) -> scalar loss
    lr: Callable[[int], float]  # learning rate at a 0-based step of the stage
    logits: Callable[[Tensor], Tensor]  # a training batch (images, or features) -> logits
    set_modes: Callable[[], None]  # train/eval modes for a training epoch
    max_norm: MaxNorm | None = None
    on_epoch: Callable[[int], None] | None = None  # called with the 0-based stage epoch before it (DRW)


def sgd_step(optimizer: torch.optim.Optimizer, loss: Tensor, lr: float,
             scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimisation step of `loss` at learning rate `lr` (set on every parameter group); `scaler` scales
    the loss for fp16 mixed precision."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train_epoch(setup: StageSetup, batches: Iterable[tuple[Tensor, Tensor]], first_step: int,
                scaler: torch.amp.GradScaler | None = None,
                device: torch.device | str = "cpu") -> tuple[Tensor, float]:
    """One epoch of `setup` over `batches` of (input, target), the first batch being step `first_step` of
    the stage; MaxNorm projects after each step or after the epoch. Returns the summed loss (a float64
    tensor on `device`) and the learning rate of the last step."""
    setup.set_modes()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for step, (x, y) in enumerate(batches, first_step):
        lr = setup.lr(step)
        loss = setup.loss_fn(setup.logits(x).float(), y)
        sgd_step(setup.optimizer, loss, lr, scaler)
        if setup.max_norm is not None:
            setup.max_norm.after("step")
        loss_sum += loss.detach().double()
    if setup.max_norm is not None:
        setup.max_norm.after("epoch")
    return loss_sum, lr


def classifier_head(model: LTClassifier) -> nn.Sequential:
    """What stage 2 trains: `model`'s classifier then its logit BN, under their names in the model's state
    dict (so a head's state dict is the model's `classifier.*` and `logit_bn.*` entries)."""
    return nn.Sequential(OrderedDict(classifier=model.classifier, logit_bn=model.logit_bn))


def classifier_setup(model: LTClassifier, cfg: Stage2Config, class_counts, stage1_weight: Tensor,
                     steps_per_epoch: int) -> StageSetup:
    """Stage 2 on backbone features with `cfg.loss`, weight decay and a cosine learning rate. Mode `retrain`:
    `model`'s classifier and logit BN are retrained, under MaxNorm with its radius from the stage-1 classifier
    weight `stage1_weight`. Mode `lws`: the classifier is frozen and a per-class scale of its logits
    (`model.use_class_scale()`, in the logit BN's place) is all that is learned; no MaxNorm. Its `logits`
    take features; the backbone is not touched."""
    max_norm = None
    if cfg.mode == "lws":
        model.classifier.requires_grad_(False)
        model.use_class_scale()
    elif cfg.maxnorm_thresh is not None:
        max_norm = MaxNorm(model.classifier.weight, relative_max_norm(stage1_weight, cfg.maxnorm_thresh),
                           cfg.maxnorm_every)
    head = classifier_head(model)
    return StageSetup(
        module=head,
        optimizer=torch.optim.SGD(weight_decay_groups(head, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum),
        loss_fn=loss_from_config(cfg, class_counts),
        lr=lr_schedule("cosine", cfg.lr, cfg.epochs, steps_per_epoch),
        logits=head,
        set_modes=head.train,
        max_norm=max_norm,
    )
