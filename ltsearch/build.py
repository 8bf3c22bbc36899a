"""What an experiment config describes, built from the parts: its data, loaders, model and losses.

The one place a config is turned into the parts' plain arguments. The parts (`data`, `images`, `models`,
`losses`) never import `config.py`; the trainers (`train.py`, `features.py`) and the search call these.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .catalog import CIFAR_DATASETS, IMAGE_DATASETS, normalization
from .config import ExperimentConfig, ModelConfig, Stage1Config, Stage2Config
from .data import LongTailData, TensorLoader, load_longtail
from .images import MEMORY_MAX_SIZE, StreamLoader, load_images
from .losses import DeferredReweighting, build_loss, class_balanced_weights
from .models import LTClassifier, build_model

__all__ = ["decode_workers", "load_data", "loss_from_config", "model_from_config", "pipeline", "split_loader"]


# ---------------------------------------------------------------- data

def pipeline(config: ExperimentConfig) -> str:
    """`memory` or `stream` for an image dataset: `data.pipeline`, with auto resolved by
    `images.MEMORY_MAX_SIZE`."""
    d = config.data
    if d.pipeline != "auto":
        return d.pipeline
    return "memory" if d.image_size <= MEMORY_MAX_SIZE else "stream"


def decode_workers(config: ExperimentConfig) -> int:
    """DataLoader worker processes decoding images for one rank: `data.workers`, else the trainer's threads
    (a Tune trial sets those to its CPUs), else every CPU this process may use."""
    if config.data.workers is not None:
        return config.data.workers
    return config.trainer.num_threads or len(os.sched_getaffinity(0))


def load_data(config: ExperimentConfig) -> LongTailData:
    """The long-tailed data an experiment config describes (its `data` section): CIFAR from its pickles
    (`data.load_longtail`), image datasets through `images.load_images` (file paths checked; decoded into
    memory on the memory pipeline)."""
    d = config.data
    subset = {"imbalance_factor": d.imbalance_factor, "profile": d.profile, "n_max": d.n_max,
              "val_per_class": d.val_per_class, "subset_seed": d.subset_seed}
    if d.dataset in CIFAR_DATASETS:
        return load_longtail(d.dataset, root=d.root, download=d.download, **subset)
    decode_size = d.image_size if pipeline(config) == "memory" else None
    return load_images(d.dataset, d.root, train_list=d.train_list, val_list=d.val_list, test_list=d.test_list,
                       decode_size=decode_size, workers=decode_workers(config), **subset)


def split_loader(config: ExperimentConfig, data: LongTailData, split: str, batch_size: int, *, train: bool,
                 sampler: str = "instance", device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1) -> TensorLoader | StreamLoader:
    """The loader of `split` ("train", "val" or "test") of `data`: a `TensorLoader` over images held in
    memory (CIFAR; image datasets on the memory pipeline, whose crop padding is image_size / 8, 4 px at 32 px),
    else a `StreamLoader` decoding the files with the dataset's colour jitter and `decode_workers` processes.
    Seed and memory format come from `config`."""
    d = config.data
    x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    common = {**normalization(d.dataset), "train": train, "seed": config.trainer.seed, "device": device,
              "channels_last": config.trainer.channels_last, "rank": rank, "world_size": world_size,
              "sampler": sampler}
    if isinstance(x, Tensor):
        padding = 4 if d.image_size is None else d.image_size // 8
        return TensorLoader(x, y, batch_size, padding=padding, **common)
    return StreamLoader(x, y, batch_size, image_size=d.image_size,
                        color_jitter=IMAGE_DATASETS[d.dataset].color_jitter, workers=decode_workers(config),
                        **common)


# ---------------------------------------------------------------- model and losses

def model_from_config(model: ModelConfig, num_classes: int) -> LTClassifier:
    """`models.build_model` with the settings of an experiment's `model` section."""
    return build_model(model.name, num_classes, nbn=model.nbn, nbn_all_bn=model.nbn_all_bn,
                       classifier_bn=model.classifier_bn, classifier=model.classifier,
                       cosine_scale=model.cosine_scale)


def loss_from_config(cfg: Stage1Config | Stage2Config, class_counts) -> nn.Module:
    """The loss of one stage's config section with its parameters (`losses.build_loss`); stage 1 with
    `drw_epoch` set wraps it in `DeferredReweighting` with class-balanced weights of `drw_beta`."""
    params = {"label_smoothing": cfg.label_smoothing, "logit_adjust_tau": cfg.logit_adjust_tau,
              "ldam_max_margin": cfg.ldam_max_margin, "ldam_scale": cfg.ldam_scale}
    if hasattr(cfg, "focal_gamma"):  # stage 2 has the class-balanced losses' beta and focal gamma
        params.update(beta=cfg.beta, gamma=cfg.focal_gamma)
    loss = build_loss(cfg.loss, class_counts, **params)
    if getattr(cfg, "drw_epoch", None) is None:
        return loss
    return DeferredReweighting(loss, class_balanced_weights(class_counts, cfg.drw_beta), cfg.drw_epoch)
