"""Stage 2 on cached features: the second phase of a `staged` search, in plain PyTorch.

With the backbone frozen (and its BN statistics frozen, the default), stage 2 only ever sees backbone
features, so they can be computed once per stage-1 checkpoint: a few augmented views of the training set
plus val and test. A stage-2 trial is then a linear classifier trained on tensors: about a second on CPU.
Epoch e of stage 2 uses view e mod V, in a permutation seeded by (seed, e).
"""
from __future__ import annotations

import math

import torch

from .config import ExperimentConfig
from .data import MEAN, STD, TensorLoader, load_data
from .files import CHECKPOINT_FILE
from .losses import build_loss
from .metrics import class_groups, feature_counts, metrics_from_counts
from .models import LTClassifier, build_model
from .regularizers import maxnorm_, relative_max_norm, row_norms, tau_normalize, weight_decay_groups
from .train import cosine_lr

__all__ = ["cache_features", "fit_classifier"]


def _load_stage1_model(config: ExperimentConfig, checkpoint_dir: str, num_classes: int) -> LTClassifier:
    """The stage-1 epoch that was best on validation, from a trainer checkpoint."""
    state = torch.load(f"{checkpoint_dir}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=False)
    model = build_model(config.model.name, num_classes, nbn=config.model.nbn, nbn_all_bn=config.model.nbn_all_bn,
                        classifier_bn=config.model.classifier_bn)
    model.load_state_dict(state["best"][1]["model"])
    return model.eval()


@torch.no_grad()
def _features(model: LTClassifier, loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.features(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def cache_features(config: ExperimentConfig, checkpoint_dir: str, views: int) -> dict:
    """Features of `views` augmented passes over the training set and of val and test, plus the stage-1
    classifier state, for the stage-1 config `config` and its checkpoint."""
    data = load_data(config)
    model = _load_stage1_model(config, checkpoint_dir, data.num_classes)
    norm = {"mean": MEAN[config.data.dataset], "std": STD[config.data.dataset]}
    batch = config.trainer.eval_batch_size
    train = TensorLoader(data.train_x, data.train_y, batch, train=True, seed=config.trainer.seed, **norm)
    train_views = []
    for view in range(views):
        train.set_epoch(10_000 + view)  # epochs that stage 1 never used
        train_views.append(_features(model, train))
    evals = {split: _features(model, TensorLoader(x, y, batch, train=False, **norm))
             for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y))}
    head = {k: v for k, v in model.state_dict().items() if k.startswith(("classifier.", "logit_bn."))}
    return {"train_views": train_views, **evals, "head": head, "class_counts": data.class_counts,
            "num_classes": data.num_classes, "feature_dim": model.feature_dim}


def _evaluate(model: LTClassifier, cache: dict, tau: float, groups: dict) -> dict:
    tau_weight = tau_normalize(model.classifier.weight.detach(), tau)
    out = {}
    for split in ("val", "test"):
        feats, labels = cache[split]
        if len(labels):
            out.update(metrics_from_counts(feature_counts(model, feats, labels, tau_weight), groups, split))
    out["classifier_norms"] = row_norms(model.classifier.weight).tolist()
    return out


def fit_classifier(cache: dict, config: ExperimentConfig, report=None) -> dict:
    """Stage 2 (class-balanced loss, weight decay, MaxNorm) on cached features; post-hoc tau with
    `config.posthoc.tau`. Calls `report(metrics)` after every epoch and returns the last metrics.
    With `stage2.enabled: false` the stage-1 classifier is only evaluated (one report): a tau search."""
    cfg, seed = config.stage2, config.trainer.seed
    model = build_model(config.model.name, cache["num_classes"], classifier_bn=config.model.classifier_bn)
    model.load_state_dict(cache["head"], strict=False)
    head = torch.nn.Sequential(model.classifier, model.logit_bn)
    max_norm = (relative_max_norm(model.classifier.weight, cfg.maxnorm_thresh)
                if cfg.maxnorm_thresh is not None else None)
    loss_fn = build_loss(cfg.loss, cache["class_counts"], beta=cfg.beta, gamma=cfg.focal_gamma)
    optimizer = torch.optim.SGD(weight_decay_groups(head, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    groups = class_groups(cache["class_counts"])
    if not cfg.enabled:
        metrics = {"stage": 2, "epoch": 1, **_evaluate(model.eval(), cache, config.posthoc.tau, groups)}
        if report is not None:
            report(metrics)
        return metrics
    views = cache["train_views"]
    steps_per_epoch = math.ceil(len(views[0][1]) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    metrics: dict = {}
    for epoch in range(cfg.epochs):
        feats, labels = views[epoch % len(views)]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        head.train()
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, 0, cfg.lr)
            loss = loss_fn(head(feats[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if max_norm is not None and cfg.maxnorm_every == "step":
                maxnorm_(model.classifier.weight, max_norm)
            loss_sum += loss.item()
        if max_norm is not None and cfg.maxnorm_every == "epoch":
            maxnorm_(model.classifier.weight, max_norm)
        head.eval()
        metrics = {"stage": 2, "epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
                   **_evaluate(model, cache, config.posthoc.tau, groups)}
        if report is not None:
            report(metrics)
    return metrics
