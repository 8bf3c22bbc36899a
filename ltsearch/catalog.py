"""What a config can name, in plain Python (no torch): the datasets, models, losses and samplers, with the
dataset facts that config validation and the parts both read, and `DataError`.

The ground floor of the package (README, "Layout"): `config.py` validates names against this module, so
validating a config loads no torch, and the parts (`data`, `images`, `models`, `losses`) never import
`config.py`. The parts keep their registries (`models.MODELS`, `losses.LOSSES`, `data.SAMPLERS`: name ->
constructor or function) under exactly these names; tests/test_layers.py checks that they agree.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CIFAR_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_DATASETS",
    "LIST_DATASETS",
    "LOSS_NAMES",
    "MEAN",
    "MODEL_NAMES",
    "REWEIGHTABLE",
    "SAMPLER_NAMES",
    "STD",
    "DataError",
    "ImageDatasetSpec",
    "normalization",
]


class DataError(ValueError):
    """A dataset is missing, corrupted, unknown or could not be downloaded."""


# ---------------------------------------------------------------- datasets

CIFAR_DATASETS = ("cifar10", "cifar100")  # read from their python pickles (ltsearch/data.py)

# Per-channel mean and std of CIFAR's training images, on pixel values scaled to [0, 1]
MEAN: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.4914, 0.4822, 0.4465),
    "cifar100": (0.5071, 0.4865, 0.4409),
}
STD: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.2470, 0.2435, 0.2616),
    "cifar100": (0.2673, 0.2564, 0.2762),
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageDatasetSpec:
    """The standard list names of an image dataset (ltsearch/images.py) and the normalisation and colour
    jitter the normalized-BN code uses for it."""

    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_jitter: float = 0.4  # brightness, contrast and saturation strength of the training jitter; 0: none


IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "image_list": ImageDatasetSpec(),
    "image_folder": ImageDatasetSpec(),
    "imagenet_lt": ImageDatasetSpec("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places_lt": ImageDatasetSpec("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    # iNaturalist 2018 has train and val lists only: val is the test set, validation comes from train
    "inat2018": ImageDatasetSpec("iNaturalist18_train.txt", None, "iNaturalist18_val.txt",
                                 mean=(0.466, 0.471, 0.380), std=(0.195, 0.194, 0.192), color_jitter=0.0),
}
# List datasets: image_list and the presets, which only fill in the standard list names (the other image
# dataset is image_folder)
LIST_DATASETS = ("image_list", "imagenet_lt", "places_lt", "inat2018")


def normalization(dataset: str) -> dict[str, tuple[float, float, float]]:
    """`{"mean": ..., "std": ...}` of a dataset (CIFAR or an image dataset), as the loaders take them."""
    if dataset in MEAN:
        return {"mean": MEAN[dataset], "std": STD[dataset]}
    return {"mean": IMAGE_DATASETS[dataset].mean, "std": IMAGE_DATASETS[dataset].std}


# ---------------------------------------------------------------- models, losses, samplers

MODEL_NAMES = ("resnet8", "resnet20", "resnet32", "resnet56", "resnet34_cifar", "resnet50", "resnext50_32x4d",
               "resnet20_a", "resnet32_a", "resnet44_a", "resnet56_a")
LOSS_NAMES = ("ce", "balanced_softmax", "logit_adjusted", "ldam", "cb_ce", "cb_softmax_bce", "cb_focal")
# Losses that take a per-class `weight` when called, so deferred re-weighting applies to them (the cb_*
# losses carry their class-balanced weights from the start).
REWEIGHTABLE = ("ce", "balanced_softmax", "logit_adjusted", "ldam")
SAMPLER_NAMES = ("instance", "class_balanced", "sqrt")
