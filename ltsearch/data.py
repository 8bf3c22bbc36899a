"""Long-tailed data: CIFAR readers, long-tail subsampling and the validation split, batch augmentation, the
epoch order every loader shares (`EpochBatches`) and the tensor loader. Plain arguments only: a config's data
and loaders are built by `ltsearch.build` (`load_data`, `split_loader`).

CIFAR stays in tensors, airbench-style: a split's images are ONE uint8 tensor (N, 3, H, W), kept on
the training device; augmentation works on whole batches with tensor ops; each epoch's order is a
permutation seeded from (seed, epoch) alone, so a resumed run sees exactly the batches it would have seen.
There is no PIL, no DataLoader and no worker process. Datasets of image files (list files, image folders)
are read by `ltsearch.images`, which builds on this module: small images into the same uint8 tensors, large
ones streamed from their files by DataLoader workers, with the same (seed, epoch) order and rank sharding.

The CIFAR pickles are read directly instead of through torchvision's dataset classes, because those verify
checksums and reject re-encoded copies such as the shared offline CIFAR-10 (see shared/data/README.md).
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .catalog import MEAN, STD, DataError, normalization

__all__ = [
    "DATASETS",
    "MEAN",
    "SAMPLERS",
    "STD",
    "DataError",
    "DatasetSpec",
    "EpochBatches",
    "LongTailData",
    "RawSplits",
    "TensorLoader",
    "default_root",
    "epoch_indices",
    "load_longtail",
    "load_split",
    "lt_class_counts",
    "normalization",
    "normalize",
    "random_crop_flip",
    "resolve_root",
    "shot_groups",
    "split_longtail",
    "tercile_groups",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Where and how one CIFAR variant is stored in its official python-version layout."""

    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    per_class_train: int  # images per class in the full training pool
    torchvision_class: str  # only used to download


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        num_classes=10, folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{k}" for k in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key=b"labels", names_key=b"label_names",
        per_class_train=5000, torchvision_class="CIFAR10"),
    "cifar100": DatasetSpec(
        num_classes=100, folder="cifar-100-python", train_files=("train",), test_files=("test",),
        meta_file="meta", label_key=b"fine_labels", names_key=b"fine_label_names",
        per_class_train=500, torchvision_class="CIFAR100"),
}

class RawSplits(NamedTuple):
    """The full official train pool and test set of one dataset."""

    train_x: Tensor  # uint8 (N, 3, 32, 32)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def default_root() -> Path:
    """The per-user cache directory, ``$XDG_CACHE_HOME/ltsearch/data`` (default ``~/.cache/...``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ltsearch" / "data"


def resolve_root(root: str | Path | None = None) -> Path:
    """The explicit root if given, else ``$LTSEARCH_DATA``, else :func:`default_root`."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("LTSEARCH_DATA")
    return Path(env).expanduser() if env else default_root()


def _download(name: str, spec: DatasetSpec, root: Path) -> None:
    import torchvision  # deferred: only a download needs it

    folder = root / spec.folder
    try:
        getattr(torchvision.datasets, spec.torchvision_class)(str(root), train=True, download=True)
    except Exception as e:  # offline machines fail in many ways (URLError, OSError, checksum RuntimeError)
        raise DataError(f"{name}: download into {root} failed ({type(e).__name__}: {e}); place the "
                        f"official python-version files in {folder} instead") from e
    if not folder.is_dir():
        raise DataError(f"{name}: download into {root} did not create {folder}")


def _read_pickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file missing (the dataset folder is incomplete)")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise nearly anything (EOFError, UnpicklingError, ...)
        raise DataError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    return obj


def _read_batches(folder: Path, files: tuple[str, ...], spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        d = _read_pickle(path, (b"data", spec.label_key))
        data = d[b"data"]
        is_array = isinstance(data, np.ndarray)
        if not is_array or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if is_array else type(data).__name__
            raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), found {desc}")
        try:
            y = np.asarray(d[spec.label_key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: labels are not integers ({e})") from e
        if y.shape != (len(data),):
            raise DataError(f"{path}: {len(data)} images but labels of shape {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(f"{path}: labels out of range [0, {spec.num_classes}): "
                            f"min {y.min()}, max {y.max()}")
        images.append(data)
        labels.append(y)
    x = np.concatenate(images).reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(labels))


def load_split(name: str, root: str | Path | None = None, download: bool = False) -> RawSplits:
    """Read the full train pool and test set of ``name`` from ``root`` (see :func:`resolve_root`)."""
    spec = _spec(name)
    root = resolve_root(root)
    folder = root / spec.folder
    if not folder.is_dir():
        if not download:
            raise DataError(f"{name}: dataset folder not found at {folder}; set data.root or LTSEARCH_DATA "
                            f"to the directory containing {spec.folder}, or set data.download: true")
        _download(name, spec, root)
    meta_path = folder / spec.meta_file
    names = _read_pickle(meta_path, (spec.names_key,))[spec.names_key]
    if len(names) != spec.num_classes:
        raise DataError(f"{meta_path}: {len(names)} class names, expected {spec.num_classes}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_x, train_y = _read_batches(folder, spec.train_files, spec)
    test_x, test_y = _read_batches(folder, spec.test_files, spec)
    return RawSplits(train_x, train_y, test_x, test_y, class_names)


def lt_class_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed subset, class 0 the largest.

    ``exp``: n_i = int(n_max * (1/IF) ** (i / (C - 1))), the usual CIFAR-LT profile.
    ``step``: the first C // 2 classes keep n_max, the rest get int(n_max / IF).
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if profile == "exp":
        last = max(num_classes - 1, 1)
        return [int(n_max * (1 / imbalance_factor) ** (i / last)) for i in range(num_classes)]
    if profile == "step":
        return [n_max if i < num_classes // 2 else int(n_max / imbalance_factor) for i in range(num_classes)]
    raise ValueError(f"unknown long-tail profile {profile!r}; expected 'exp' or 'step'")


def shot_groups(class_counts: list[int]) -> dict[str, list[int]]:
    """Class indices by training count: many (> 100), medium (20..100), few (< 20)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        groups["many" if n > 100 else "medium" if n >= 20 else "few"].append(c)
    return groups


def tercile_groups(class_counts: list[int]) -> dict[str, list[int]]:
    """Classes split into near-equal thirds by count (descending, ties by index): head, middle, tail.

    For datasets whose shot split is degenerate, e.g. CIFAR-10-LT has no few-shot class.
    """
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    head, middle, tail = (part.tolist() for part in np.array_split(np.array(order, dtype=np.int64), 3))
    return {"head": head, "middle": middle, "tail": tail}


def split_longtail(labels: Tensor, counts: list[int], val_per_class: int = 20,
                   seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Pick a long-tailed train subset and a balanced validation set from a training pool.

    Each class's pool indices are ordered by file order (``seed=None``: the standard CIFAR-LT "first n_i
    images of class i") or by one permutation of the pool seeded with ``seed``. Validation takes the LAST
    ``val_per_class`` images of that order and train the first ``min(counts[c], pool_c - val_per_class)``,
    so the two are disjoint. A class whose count asks for (nearly) its whole pool therefore loses images to
    validation: the head class of CIFAR-100-LT (n_0 = 500 = its pool) keeps 480 with the default 20.

    Returns sorted int64 ``(train_idx, val_idx)`` into ``labels``.
    """
    num_classes, n = len(counts), len(labels)
    if n and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} has no entry in counts (length {num_classes})")
    pool = torch.bincount(labels, minlength=num_classes)
    small = torch.nonzero(pool < val_per_class + 1).flatten()
    if len(small):
        c = int(small[0])
        raise ValueError(f"class {c} has {int(pool[c])} images, needs at least {val_per_class + 1} "
                         f"for {val_per_class} validation images plus one training image")
    if seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, in-class order kept
    y = labels[order]
    rank = torch.arange(n) - (torch.cumsum(pool, 0) - pool)[y]  # position within the class's ordered pool
    keep = pool - val_per_class
    n_train = torch.minimum(torch.tensor(counts), keep)
    train, val = order[rank < n_train[y]], order[rank >= keep[y]]
    return train.sort().values, val.sort().values


@dataclass(frozen=True)
class LongTailData:
    """A long-tailed train set, a validation set (balanced unless a list says otherwise) and the test set.

    Images are uint8 tensors (N, 3, H, W) held in memory, or files read as they are needed (streamed:
    `ltsearch.images.ImageFiles`, typed here by what this module needs of it, a length); labels are always
    int64 tensors."""

    train_x: Tensor | Sized
    train_y: Tensor
    val_x: Tensor | Sized
    val_y: Tensor
    test_x: Tensor | Sized
    test_y: Tensor
    class_counts: list[int]  # actual per-class train counts, after validation took its share
    class_names: list[str]
    num_classes: int


def load_longtail(dataset: str, root: str | Path | None = None, download: bool = False,
                  imbalance_factor: float = 100.0, profile: str = "exp", val_per_class: int = 20,
                  subset_seed: int | None = None, n_max: int | None = None) -> LongTailData:
    """Read ``dataset`` and build its long-tailed version (see :func:`split_longtail`).

    ``n_max`` defaults to the dataset's images per class (5000 for CIFAR-10, 500 for CIFAR-100).
    """
    spec = _spec(dataset)
    raw = load_split(dataset, root, download)
    n_max = spec.per_class_train if n_max is None else n_max
    counts = lt_class_counts(n_max, spec.num_classes, imbalance_factor, profile)
    train_idx, val_idx = split_longtail(raw.train_y, counts, val_per_class, subset_seed)
    train_y = raw.train_y[train_idx]
    return LongTailData(
        train_x=raw.train_x[train_idx], train_y=train_y,
        val_x=raw.train_x[val_idx], val_y=raw.train_y[val_idx],
        test_x=raw.test_x, test_y=raw.test_y,
        class_counts=torch.bincount(train_y, minlength=spec.num_classes).tolist(),
        class_names=raw.class_names, num_classes=spec.num_classes)


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Zero-pad a uint8 batch (B, C, H, W), take a random HxW crop per image, flip half of them.

    Offsets (in [0, 2 * padding]) and flips are drawn on the generator's device and moved to ``x``'s, so a
    CPU generator gives the same augmentation for CPU and CUDA batches. One advanced-indexing gather does
    all crops and flips at once.
    """
    b, _, h, w = x.shape
    draw = {"generator": generator, "device": generator.device}
    dy = torch.randint(0, 2 * padding + 1, (b, 1), **draw).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), **draw).to(x.device)
    flip = (torch.rand(b, 1, **draw) < 0.5).to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)
    padded = F.pad(x, (padding,) * 4)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def _class_power(power: float):
    """A draw of N indices with replacement, class c with probability ~ n_c^power and uniform within it."""

    def draw(labels: Tensor, generator: torch.Generator) -> Tensor:
        counts = torch.bincount(labels).double()
        per_image = counts.pow(power - 1.0)[labels]  # n_c images of weight n_c^(power - 1): class mass n_c^power
        return torch.multinomial(per_image, len(labels), replacement=True, generator=generator)

    return draw


# An epoch's training indices from (CPU int64 labels, a seeded generator), N of them whatever the sampler:
# instance sampling is a permutation (each image once); class_balanced draws classes uniformly (cRT, Kang et
# al. 2020); sqrt draws class c with probability ~ sqrt(n_c) (square-root sampling). Classes without images are
# never drawn.
SAMPLERS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "instance": lambda labels, generator: torch.randperm(len(labels), generator=generator),
    "class_balanced": _class_power(0.0),
    "sqrt": _class_power(0.5),
}  # the names of `catalog.SAMPLER_NAMES`, which a config is validated against


def epoch_indices(labels: Tensor, sampler: str, seed: int, epoch: int) -> Tensor:
    """The training indices of one epoch, drawn by `SAMPLERS[sampler]` from a generator seeded with
    ``seed * 100003 + epoch`` alone (the same on every rank, so ranks can shard one order)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](labels.cpu(), torch.Generator().manual_seed(seed * 100003 + epoch))


class EpochBatches:
    """Which images one rank takes, batch by batch, in each epoch: the order both loaders share.

    Training order is ``epoch_indices(labels, sampler, seed, epoch)`` (instance sampling: ``randperm(N)``
    seeded with ``seed * 100003 + epoch``; class-balanced and square-root sampling: N draws with replacement
    from the same seed), so an epoch is reproducible from those alone (exact resume after ``set_epoch``). For
    DDP each rank takes ``indices[rank::world_size]``; in training the order is first padded by repeating its
    start to a multiple of ``world_size`` (like DistributedSampler) so all ranks do the same number of steps.
    Evaluation shards without padding, so no image counts twice in summed metrics; ranks then differ by at
    most one batch.
    """

    def __init__(self, labels: Tensor, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, sampler: str = "instance"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        self.cpu_labels = labels.cpu()  # the epoch's draw is made on the CPU, identically on every rank
        self.sampler = sampler
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_local(self) -> int:
        n = len(self.cpu_labels)
        if self.train:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n, bs = self._num_local(), self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def _padded_total(self) -> int:
        """Length of a training epoch's order once padded to a multiple of `world_size`."""
        return math.ceil(len(self.cpu_labels) / self.world_size) * self.world_size

    def _indices(self) -> Tensor:
        """This rank's indices of the current epoch, in order (CPU int64)."""
        n = len(self.cpu_labels)
        if not self.train:
            return torch.arange(n)[self.rank::self.world_size]
        perm = epoch_indices(self.cpu_labels, self.sampler, self.seed, self.epoch)
        total = self._padded_total()
        perm = perm.repeat(math.ceil(total / n))[:total]  # pad with the order's beginning
        return perm[self.rank::self.world_size]


class TensorLoader(EpochBatches):
    """Batches ``(normalised float images, labels)`` from uint8 tensors kept on ``device``.

    The order is `EpochBatches`'; augmentation (``random_crop_flip`` with ``padding``) is seeded from
    (seed, epoch, rank), so an epoch is reproducible from those alone.
    """

    def __init__(self, images_uint8: Tensor, labels: Tensor, batch_size: int, mean, std, train: bool,
                 seed: int = 0, device: str | torch.device = "cpu", channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, sampler: str = "instance",
                 padding: int = 4):
        if len(images_uint8) != len(labels):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
        super().__init__(labels, batch_size, train, seed, rank, world_size, drop_last, sampler)
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device)
        self.channels_last, self.padding = channels_last, padding
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self._indices().to(self.device)
        aug = None
        if self.train:
            aug = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 1009 + self.rank + 1)
        for k in range(len(self)):
            idx = indices[k * self.batch_size:(k + 1) * self.batch_size]
            x = self.images[idx]
            if aug is not None:
                x = random_crop_flip(x, aug, self.padding)
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[idx]


def normalize(x: Tensor, mean: Tensor, std: Tensor, channels_last: bool) -> Tensor:
    """uint8 images to float ``(x / 255 - mean) / std`` (mean, std: (1, C, 1, 1) on x's device)."""
    x = x.float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

