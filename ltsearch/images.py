"""Image datasets read from files: list files (ImageNet-LT, Places-LT, iNaturalist 2018, your own) and image
folders, held in memory or streamed from their files. Plain arguments only (a config's are passed by
`ltsearch.build`); the long-tail subset, the validation split and the epoch order come from `ltsearch.data`.

A **list dataset** is one text file per split in the classifier-balancing format (Kang et al. 2020), each line
``relative/path.jpg label``, paths relative to ``data.root``; the presets `imagenet_lt`, `places_lt` and
`inat2018` only fill in the standard list names (`catalog.IMAGE_DATASETS`). Classes are 0..C-1 of the train
list, which gives the class counts (shot groups, terciles). Without a validation list (inat2018, whose val list
is its test set) a balanced validation set of `data.val_per_class` images per class is taken from the train
list (`data.split_longtail`: the last ones of each class in list order, or a seeded choice). An **image folder** is
``root/train/<class>/**/*.jpg`` (classes in sorted folder order, as torchvision's ImageFolder), optional
``val/`` and ``test/`` with the same class folders; it is subsampled to a long tail as CIFAR is.

Every listed path is checked before training (one directory listing per folder, so it is cheap on network
file systems too); a missing file is a one-line `DataError` naming the list file, its line and the path. A
corrupt image is found when it is first decoded and reported the same way, never skipped.

Two pipelines (`data.pipeline`; auto: memory up to 64 px, stream above):
- **memory**: every image is decoded once (short side resized to `image_size`, centre crop) into the uint8
  tensors CIFAR uses, and trained with the same `TensorLoader` (batched crop with image_size / 8 padding and
  flip). For CIFAR-sized images decoding every epoch would cost more than the model.
- **stream** (`StreamLoader`): DataLoader worker processes decode each batch's JPEGs every epoch with the
  augmentation of the normalized-BN code (yuxiangbao/NBN, data/dataloader.py) for these datasets: random-
  resized crop to `image_size` (scale 0.08-1), horizontal flip, colour jitter 0.4 (brightness, contrast,
  saturation; none for iNaturalist), and for evaluation a resize of the short side to 256/224 of
  `image_size` and a centre crop; workers return uint8 tensors, normalised on the training device. The epoch
  order is `EpochBatches`' (seeded from (seed, epoch), each DDP rank its own shard), and each image's
  augmentation is seeded from (seed, epoch, its position in the epoch), so a resumed run, or one with another
  number of workers, sees the same batches.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .catalog import IMAGE_DATASETS, DataError
from .data import EpochBatches, LongTailData, lt_class_counts, normalize, split_longtail

__all__ = [
    "IMAGE_DATASETS",
    "MEMORY_MAX_SIZE",
    "ImageFiles",
    "StreamLoader",
    "decode_all",
    "load_images",
    "read_list",
]

MEMORY_MAX_SIZE = 64  # pipeline auto: images up to this side (px) are held in memory, larger ones streamed


@dataclass(frozen=True)
class ImageFiles:
    """The image files of one split, read when they are needed. Paths are absolute and kept in numpy arrays
    (no Python object per image, so DataLoader workers share them without copy-on-write growth)."""

    paths: np.ndarray  # str
    source: str  # the list file, or the folder, they come from
    lines: np.ndarray | None = None  # each image's line number in `source` (a list file); None for a folder

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """How an error names image `i`: its list file and line, and its path."""
        if self.lines is None:
            return str(self.paths[i])
        return f"{self.source} line {int(self.lines[i])}: {self.paths[i]}"

    def subset(self, idx: Tensor) -> ImageFiles:
        idx = idx.numpy()
        return ImageFiles(self.paths[idx], self.source, None if self.lines is None else self.lines[idx])


# ---------------------------------------------------------------- reading lists and folders

def _list_path(root: Path, name: str) -> Path:
    """A list file: absolute, or relative to the image root."""
    return Path(os.path.normpath(root / Path(name).expanduser()))  # an absolute name stays itself


def read_list(root: Path, name: str, key: str) -> tuple[ImageFiles, Tensor]:
    """The images and labels of one list file (`key` is its config key, named when the file is missing)."""
    path = _list_path(root, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"data.{key}: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.{key}: {path}: cannot read the list ({type(err).__name__}: {err})") from None
    paths, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path} line {number}: expected 'relative/path.jpg label', got {line.strip()!r}")
        name, label = parts
        if not (label.isascii() and label.isdigit()):
            raise DataError(f"{path} line {number}: label {label!r} is not a class index (an integer >= 0)")
        paths.append(os.path.normpath(os.path.join(root, name)))
        labels.append(int(label))
        lines.append(number)
    if not paths:
        raise DataError(f"{path}: lists no image (expected lines 'relative/path.jpg label')")
    files = ImageFiles(np.array(paths), str(path), np.array(lines, dtype=np.int64))
    return files, torch.tensor(labels, dtype=torch.int64)


def check_files(files: ImageFiles) -> None:
    """Refuse the first listed file that does not exist, before any training: one directory listing per
    folder rather than one stat per image."""
    listings: dict[str, set[str]] = {}
    for i, path in enumerate(files.paths):
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            raise DataError(f"{files.where(i)}: file not found")


def _class_names(files: ImageFiles, labels: Tensor, num_classes: int) -> list[str]:
    """Each class's name: the folder all its images are under (ImageNet-LT: its WordNet id) when those are
    distinct, else "0", "1", ..."""
    by_class: list[list[str]] = [[] for _ in range(num_classes)]
    for path, c in zip(files.paths.tolist(), labels.tolist(), strict=True):
        by_class[c].append(os.path.dirname(path))
    names = [os.path.basename(os.path.commonpath(folders)) for folders in by_class]
    return names if len(set(names)) == num_classes else [str(c) for c in range(num_classes)]


def _balanced_split(labels: Tensor, counts: list[int], val_per_class: int, seed: int | None,
                    source: str) -> tuple[Tensor, Tensor]:
    try:
        return split_longtail(labels, counts, val_per_class, seed)
    except ValueError as err:
        raise DataError(f"data.val_per_class: {source}: {err}; lower data.val_per_class or give the dataset "
                        "a validation set") from None


Splits = dict[str, tuple[ImageFiles, Tensor]]  # split name -> (its images, their labels)


def _list_splits(root: Path, train_list: str, val_list: str | None, test_list: str | None, val_per_class: int,
                 subset_seed: int | None) -> tuple[Splits, list[str], int]:
    if not root.is_dir():
        raise DataError(f"data.root: {root}: folder not found")
    train, train_y = read_list(root, train_list, "train_list")
    num_classes = int(train_y.max()) + 1
    pool = torch.bincount(train_y, minlength=num_classes)
    if (pool == 0).any():
        c = int(torch.nonzero(pool == 0)[0])
        raise DataError(f"{train.source}: class {c} has no image (labels must run from 0 to {num_classes - 1} "
                        "without gaps)")
    splits = {}
    for split, name in (("val", val_list), ("test", test_list)):
        if name is None:
            continue
        files, y = read_list(root, name, f"{split}_list")
        bad = torch.nonzero(y >= num_classes)
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{files.source} line {int(files.lines[i])}: label {int(y[i])} is not a class of "
                            f"the train list {train.source} (labels 0..{num_classes - 1})")
        splits[split] = (files, y)
    if val_list is None:
        train_idx, val_idx = _balanced_split(train_y, pool.tolist(), val_per_class, subset_seed, train.source)
        splits["val"] = (train.subset(val_idx), train_y[val_idx])
        splits["train"] = (train.subset(train_idx), train_y[train_idx])
    else:
        splits["train"] = (train, train_y)
    for files, _ in splits.values():
        check_files(files)
    return splits, _class_names(train, train_y, num_classes), num_classes


def _scan(folder: Path, class_to_idx: dict[str, int], allow_empty: bool) -> tuple[ImageFiles, Tensor]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    except FileNotFoundError as err:
        raise DataError(f"{folder}: {err}") from None
    paths = np.array([p for p, _ in samples], dtype=str)
    return ImageFiles(paths, str(folder)), torch.tensor([c for _, c in samples], dtype=torch.int64)


def _classes(folder: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(folder)[0]
    except FileNotFoundError:
        raise DataError(f"{folder}: no class folder (an image folder is train/<class>/*.jpg, with optional "
                        "val/<class>/ and test/<class>/)") from None


def _folder_splits(root: Path, imbalance_factor: float, profile: str, n_max: int | None, val_per_class: int,
                   subset_seed: int | None) -> tuple[Splits, list[str], int]:
    if not (root / "train").is_dir():
        raise DataError(f"data.root: {root / 'train'}: folder not found (an image folder is train/<class>/*.jpg, "
                        "with optional val/ and test/)")
    classes = _classes(root / "train")
    class_to_idx = {name: c for c, name in enumerate(classes)}
    splits = {}
    for split in ("val", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        extra = sorted(set(_classes(folder)) - set(classes))
        if extra:
            raise DataError(f"{folder / extra[0]}: class {extra[0]!r} has no folder under {root / 'train'}")
        splits[split] = _scan(folder, class_to_idx, allow_empty=True)
    train, train_y = _scan(root / "train", class_to_idx, allow_empty=False)
    pool = torch.bincount(train_y, minlength=len(classes))
    counts = lt_class_counts(n_max or int(pool.max()), len(classes), imbalance_factor, profile)
    if "val" in splits:  # the long-tailed subset only: nothing to hold out
        train_idx, _ = split_longtail(train_y, counts, 0, subset_seed)
    else:
        train_idx, val_idx = _balanced_split(train_y, counts, val_per_class, subset_seed, str(root / "train"))
        splits["val"] = (train.subset(val_idx), train_y[val_idx])
    splits["train"] = (train.subset(train_idx), train_y[train_idx])
    return splits, classes, len(classes)


def load_images(dataset: str, root: str | Path, *, train_list: str | None = None, val_list: str | None = None,
                test_list: str | None = None, imbalance_factor: float = 1.0, profile: str = "exp",
                n_max: int | None = None, val_per_class: int = 20, subset_seed: int | None = None,
                decode_size: int | None = None, workers: int = 0) -> LongTailData:
    """The data of an image dataset (the `data` keys of the same names; README, "Your own dataset"), every
    path checked. `image_folder` is subsampled to a long tail by `imbalance_factor`, `profile` and `n_max` as
    CIFAR is; a list dataset (any other name) is used as `train_list` says. Without a validation list or val/
    folder, `val_per_class` images per class are held out of train (`subset_seed`: None, the last in file
    order). `decode_size`: every image decoded (short side resized to it, centre crop) into uint8 tensors by
    `workers` processes, the memory pipeline; None keeps the files, to be streamed."""
    root = Path(root)
    if dataset == "image_folder":
        splits, class_names, num_classes = _folder_splits(root, imbalance_factor, profile, n_max, val_per_class,
                                                          subset_seed)
    else:
        splits, class_names, num_classes = _list_splits(root, train_list, val_list, test_list, val_per_class,
                                                        subset_seed)
    empty = (ImageFiles(np.array([], dtype=str), ""), torch.zeros(0, dtype=torch.int64))
    train, val, test = (splits.get(s, empty) for s in ("train", "val", "test"))
    images = [files for files, _ in (train, val, test)]
    if decode_size is not None:
        images = [decode_all(files, decode_size, workers) for files in images]
    return LongTailData(
        train_x=images[0], train_y=train[1], val_x=images[1], val_y=val[1], test_x=images[2], test_y=test[1],
        class_counts=torch.bincount(train[1], minlength=num_classes).tolist(), class_names=class_names,
        num_classes=num_classes)


# ---------------------------------------------------------------- decoding

def train_transform(size: int, color_jitter: float):
    """The normalized-BN code's training augmentation, ending in a uint8 (3, size, size) tensor."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    if color_jitter:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose([*steps, v2.PILToTensor()])


def eval_transform(size: int, margin: float = 256 / 224):
    """Resize the short side to `margin` * size (256 px for 224), then a centre size x size crop; margin 1
    is the memory pipeline's stored image."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(round(size * margin)), v2.CenterCrop(size), v2.PILToTensor()])


@dataclass(frozen=True)
class _Failure:
    """An image that could not be read, sent back from a worker instead of raising there (a worker's exception
    reaches the training process as a multi-line traceback)."""

    message: str


class _Decode(torch.utils.data.Dataset):
    """Item (index, augmentation seed) -> (uint8 image tensor, label), or a `_Failure`. A seed below 0 draws
    no random numbers (evaluation)."""

    def __init__(self, files: ImageFiles, labels: Tensor, transform):
        self.files, self.labels, self.transform = files, labels.numpy(), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        try:
            with Image.open(str(self.files.paths[i])) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = (str(err).splitlines() or [""])[0]
            return _Failure(f"{self.files.where(i)}: cannot read the image ({type(err).__name__}: {reason})")
        if seed < 0:
            return self.transform(image), int(self.labels[i])
        with torch.random.fork_rng(devices=[]):  # never disturbs the training process's generator
            torch.default_generator.manual_seed(seed)  # the CPU one only: torch.manual_seed costs ~10x more
            return self.transform(image), int(self.labels[i])


def _collate(samples: list) -> tuple[Tensor, Tensor] | _Failure:
    for sample in samples:
        if isinstance(sample, _Failure):
            return sample
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.int64)


def _batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if isinstance(batch, _Failure):
            raise DataError(batch.message)
        yield batch


def decode_all(files: ImageFiles, size: int, workers: int = 0, batch_size: int = 256) -> Tensor:
    """Every image of `files`, short side resized to `size` and centre-cropped: uint8 (N, 3, size, size)."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    keys = [[(i, -1) for i in range(start, min(start + batch_size, len(files)))]
            for start in range(0, len(files), batch_size)]
    labels = torch.zeros(len(files), dtype=torch.int64)
    loader = torch.utils.data.DataLoader(_Decode(files, labels, eval_transform(size, margin=1.0)),
                                         batch_sampler=keys, num_workers=workers, collate_fn=_collate,
                                         generator=torch.Generator())
    start = 0
    for x, _ in _batches(loader):
        out[start:start + len(x)] = x
        start += len(x)
    return out


class _Keys:
    """The DataLoader's batch sampler: one rank's (index, augmentation seed) pairs of the current epoch."""

    def __init__(self, order: StreamLoader):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        o = self.order
        indices = o._indices().tolist()
        if o.train:  # one seed per position of the padded epoch order, sharded as the indices are
            generator = torch.Generator().manual_seed((o.seed * 100003 + o.epoch) * 1009)
            seeds = torch.randint(0, 2**62, (o._padded_total(),), generator=generator)
            seeds = seeds[o.rank::o.world_size].tolist()
        else:
            seeds = [-1] * len(indices)
        bs = o.batch_size
        for k in range(len(o)):
            yield list(zip(indices[k * bs:(k + 1) * bs], seeds[k * bs:(k + 1) * bs], strict=True))


class StreamLoader(EpochBatches):
    """Batches ``(normalised float images, labels)`` decoded from image files by `workers` DataLoader processes
    (0: in this process); training batches augmented as the module docstring says, evaluation batches
    resized and centre-cropped. Order and sharding are `EpochBatches`'. Training keeps its workers between
    epochs; an unreadable image raises `DataError` naming it."""

    def __init__(self, files: ImageFiles, labels: Tensor, batch_size: int, mean, std, train: bool, *,
                 image_size: int, color_jitter: float = 0.4, seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 sampler: str = "instance", workers: int = 0):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} images but {len(labels)} labels")
        super().__init__(labels, batch_size, train, seed, rank, world_size, drop_last, sampler)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        transform = train_transform(image_size, color_jitter) if train else eval_transform(image_size)
        self.loader = torch.utils.data.DataLoader(
            _Decode(files, labels, transform), batch_sampler=_Keys(self), num_workers=workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda", persistent_workers=train and workers > 0,
            generator=torch.Generator())  # its own: a DataLoader otherwise draws its workers' seeds from torch's

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in _batches(self.loader):
            x = x.to(self.device, non_blocking=True)
            yield normalize(x, self.mean, self.std, self.channels_last), y.to(self.device, non_blocking=True)

