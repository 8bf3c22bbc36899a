"""Stage 2 on cached features: the second phase of a `staged` search, in plain PyTorch.

With the backbone frozen (and its BN statistics frozen, the default), stage 2 only ever sees backbone
features, so they can be computed once per stage-1 checkpoint: a few augmented views of the training set
plus val and test. A stage-2 trial is then a linear classifier trained on tensors: about a second on CPU.
Epoch e of stage 2 uses view e mod V, in the order `stage2.sampler` draws from (seed, e), as the trainer's
loader does (a permutation for instance sampling).

Features are kept in `FEATURE_DTYPE` (float16) and cast to float32 one batch at a time, so a view takes
N x D x 2 bytes: 0.47 GB for ImageNet-LT's 115,846 x 2,048, half of float32. float16 rather than bfloat16:
its rounding error is 8x smaller (unit roundoff 2^-11 against 2^-8; tests/test_features.py measures what
each does to a stage-2 fit), and bfloat16's wider range is not needed: pooled post-ReLU features of a
BatchNorm network stay far below float16's largest value, 65,504. Features that would overflow it are
refused when cached, never stored as inf.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from .build import load_data, model_from_config, split_loader
from .config import ExperimentConfig
from .data import epoch_indices
from .files import CHECKPOINT_FILE
from .metrics import class_groups, classifier_metrics
from .models import LTClassifier
from .optim import classifier_head, classifier_setup, train_epoch

__all__ = ["FEATURE_DTYPE", "cache_features", "fit_classifier"]

FEATURE_DTYPE = torch.float16
# Rows of val/test features cast to float32 at a time for evaluation: 8,192 x 2,048 x 4 bytes = 64 MiB.
EVAL_ROWS = 8192


def _load_stage1_model(config: ExperimentConfig, checkpoint_dir: str, num_classes: int) -> LTClassifier:
    """The stage-1 epoch that was best on validation, from a trainer checkpoint."""
    state = torch.load(f"{checkpoint_dir}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=False)
    model = model_from_config(config.model, num_classes)
    model.load_state_dict(state["best"][1]["model"])
    return model.eval()


@torch.no_grad()
def _features(model: LTClassifier, loader: Iterable, checkpoint_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every batch of `loader` in `FEATURE_DTYPE`, and their labels."""
    feats, labels = [], []
    for x, y in loader:
        batch = model.features(x)
        compact = batch.to(FEATURE_DTYPE)
        if not compact.isfinite().all():
            raise ValueError(f"backbone features of {checkpoint_dir} do not fit {FEATURE_DTYPE} "
                             f"(largest magnitude {batch.abs().max().item():.3g})")
        feats.append(compact)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _float_batches(feats: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cached features in float32 chunks of `EVAL_ROWS`, with their labels."""
    for start in range(0, len(labels), EVAL_ROWS):
        yield feats[start:start + EVAL_ROWS].float(), labels[start:start + EVAL_ROWS]


def cache_features(config: ExperimentConfig, checkpoint_dir: str, views: int) -> dict:
    """Features of `views` augmented passes over the training set and of val and test, plus the stage-1
    classifier state, for the stage-1 config `config` and its checkpoint."""
    data = load_data(config)
    model = _load_stage1_model(config, checkpoint_dir, data.num_classes)
    batch = config.trainer.eval_batch_size
    train = split_loader(config, data, "train", batch, train=True)  # in memory, or streamed from image files
    train_views = []
    for view in range(views):
        train.set_epoch(10_000 + view)  # epochs that stage 1 never used
        train_views.append(_features(model, train, checkpoint_dir))
    evals = {split: _features(model, split_loader(config, data, split, batch, train=False), checkpoint_dir)
             for split in ("val", "test")}
    return {"train_views": train_views, **evals, "head": classifier_head(model).state_dict(), "class_counts": data.class_counts,
            "num_classes": data.num_classes, "feature_dim": model.feature_dim}


def _stage1_head(config: ExperimentConfig, cache: dict) -> LTClassifier:
    """A model whose classifier (and logit BN) hold the cached stage-1 head. Every key is required: a head
    that does not fit `config.model.classifier` and `classifier_bn` would otherwise start stage 2 from a random
    classifier."""
    model = model_from_config(config.model, cache["num_classes"])
    head = classifier_head(model)
    missing = sorted(head.state_dict().keys() - cache["head"].keys())
    unexpected = sorted(cache["head"].keys() - head.state_dict().keys())
    if missing or unexpected:
        raise ValueError(f"the cached stage-1 head does not fit model.classifier={config.model.classifier!r}, "
                         f"classifier_bn={config.model.classifier_bn!r}: missing {missing}, unexpected {unexpected}")
    head.load_state_dict(cache["head"])
    return model


def fit_classifier(cache: dict, config: ExperimentConfig, report=None) -> dict:
    """Stage 2 (any `stage2.mode`, `loss` and `sampler`, weight decay, MaxNorm) on cached features; post-hoc tau
    with `config.posthoc.tau`. Calls `report(metrics)` after every epoch and returns the last metrics.
    With `stage2.enabled: false` the stage-1 classifier is only evaluated (one report): a tau search.
    Every epoch's metrics hold `val_correct`, the per-image validation correctness of the classifier and of
    its tau-normalised copy (a (2, images) bool tensor, in the cache's val order), for the paired tie test."""
    cfg, seed = config.stage2, config.trainer.seed
    model = _stage1_head(config, cache)
    groups = class_groups(cache["class_counts"])
    splits = [split for split in ("val", "test") if len(cache[split][1])]

    def evaluate() -> dict:
        batches = {split: _float_batches(*cache[split]) for split in splits}
        return classifier_metrics(model.eval(), batches, config.posthoc.tau, groups, per_image=["val"])

    if not cfg.enabled:
        metrics = {"stage": 2, "epoch": 1, **evaluate()}
        if report is not None:
            report(metrics)
        return metrics
    views = cache["train_views"]
    steps_per_epoch = math.ceil(len(views[0][1]) / cfg.batch_size)
    setup = classifier_setup(model, cfg, cache["class_counts"], model.classifier.weight, steps_per_epoch)
    metrics: dict = {}
    for epoch in range(cfg.epochs):
        feats, labels = views[epoch % len(views)]
        order = epoch_indices(labels, cfg.sampler, seed, epoch)  # as the trainer's loader draws an epoch
        batches = ((feats[idx].float(), labels[idx]) for idx in order.split(cfg.batch_size))
        loss_sum, _ = train_epoch(setup, batches, epoch * steps_per_epoch)
        metrics = {"stage": 2, "epoch": epoch + 1, "train_loss": loss_sum.item() / steps_per_epoch, **evaluate()}
        if report is not None:
            report(metrics)
    return metrics
