"""Tests of ltsearch.data on synthetic CIFAR folders (see conftest.py); nothing here touches the network."""
from __future__ import annotations

import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ltsearch.build import load_data, split_loader
from ltsearch.data import (
    DATASETS,
    MEAN,
    SAMPLERS,
    STD,
    DataError,
    LongTailData,
    TensorLoader,
    default_root,
    epoch_indices,
    load_longtail,
    load_split,
    lt_class_counts,
    normalization,
    random_crop_flip,
    resolve_root,
    shot_groups,
    split_longtail,
    tercile_groups,
)

# ---------------------------------------------------------------- long-tail counts and class groups

@pytest.mark.parametrize("args, total", [
    ((500, 100, 100), 10847), ((500, 100, 50), 12608), ((500, 100, 10), 19573), ((5000, 10, 100), 12406),
])
def test_exp_counts_match_the_standard_cifar_lt_sizes(args, total):
    counts = lt_class_counts(*args)
    assert sum(counts) == total
    assert counts[0] == args[0]
    assert counts == sorted(counts, reverse=True)


def test_cifar100_lt_smallest_class_is_five():
    assert min(lt_class_counts(500, 100, 100)) == 5


def test_step_profile():
    assert lt_class_counts(500, 100, 100, "step") == [500] * 50 + [5] * 50
    assert lt_class_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]


def test_balanced_when_imbalance_is_one():
    assert lt_class_counts(500, 100, 1) == [500] * 100


@pytest.mark.parametrize("imbalance, profile", [(0.5, "exp"), (0.0, "step"), (10, "linear")])
def test_bad_imbalance_or_profile(imbalance, profile):
    with pytest.raises(ValueError):
        lt_class_counts(500, 100, imbalance, profile)


def test_shot_group_thresholds():
    assert shot_groups([19, 20, 100, 101]) == {"many": [3], "medium": [1, 2], "few": [0]}


def test_shot_groups_may_be_empty():
    assert shot_groups([500, 200]) == {"many": [0, 1], "medium": [], "few": []}
    groups = shot_groups(lt_class_counts(5000, 10, 100))
    assert groups["few"] == [] and sorted(c for g in groups.values() for c in g) == list(range(10))


def test_tercile_groups():
    assert tercile_groups(lt_class_counts(5000, 10, 100)) == {
        "head": [0, 1, 2, 3], "middle": [4, 5, 6], "tail": [7, 8, 9]}
    assert tercile_groups([5, 5, 1, 9]) == {"head": [3, 0], "middle": [1], "tail": [2]}


# ---------------------------------------------------------------- train / val split

def _pool(per_class=500, num_classes=100, seed=0):
    """Shuffled labels of a CIFAR-100-sized training pool."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_split_is_disjoint_balanced_and_keeps_480_of_the_full_head_class():
    labels, counts = _pool(), lt_class_counts(500, 100, 100)
    train, val = split_longtail(labels, counts, val_per_class=20)
    assert train.dtype == val.dtype == torch.int64
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val], minlength=100).tolist() == [20] * 100
    train_counts = torch.bincount(labels[train], minlength=100).tolist()
    assert train_counts[0] == 480
    assert train_counts == [min(n, 480) for n in counts]
    assert sum(train_counts) == 10847 - 20


def test_split_default_takes_the_first_images_in_file_order():
    labels, counts = _pool(), lt_class_counts(500, 100, 100)
    train, val = split_longtail(labels, counts, val_per_class=20)
    train_set, val_set = set(train.tolist()), set(val.tolist())
    for c in (0, 1, 50, 99):
        pool = torch.nonzero(labels == c).flatten().tolist()
        n = min(counts[c], len(pool) - 20)
        assert set(pool[:n]) <= train_set and not set(pool[n:]) & train_set
        assert set(pool[-20:]) <= val_set


def test_split_seed_is_deterministic_and_seeds_differ():
    labels, counts = _pool(), lt_class_counts(500, 100, 100)
    a, b, c = (split_longtail(labels, counts, seed=s) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert torch.equal(torch.bincount(labels[a[0]]), torch.bincount(labels[c[0]]))
    assert not torch.equal(a[0], split_longtail(labels, counts)[0])


def test_split_without_validation():
    labels, counts = _pool(), lt_class_counts(500, 100, 100)
    train, val = split_longtail(labels, counts, val_per_class=0)
    assert val.numel() == 0
    assert torch.bincount(labels[train], minlength=100).tolist() == counts


def test_split_rejects_classes_too_small_for_validation():
    with pytest.raises(ValueError, match="class 1"):
        split_longtail(torch.tensor([0] * 30 + [1] * 20), [30, 20], val_per_class=20)


# ---------------------------------------------------------------- readers

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_read_cifar100_uses_fine_labels(cifar100_root):
    raw = load_split("cifar100", cifar100_root)
    assert raw.train_x.shape == (3000, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (500, 3, 32, 32) and raw.test_x.dtype == torch.uint8
    assert raw.train_y.dtype == raw.test_y.dtype == torch.int64
    assert torch.bincount(raw.train_y).tolist() == [30] * 100
    assert torch.bincount(raw.test_y).tolist() == [5] * 100
    assert raw.class_names == [f"fine{c}" for c in range(100)]
    d = _unpickle(cifar100_root / "cifar-100-python" / "train")
    assert raw.train_y.tolist() == d[b"fine_labels"]
    assert np.array_equal(raw.train_x[7].numpy(), d[b"data"][7].reshape(3, 32, 32))


def test_read_cifar10_concatenates_the_five_batches(cifar10_root):
    raw = load_split("cifar10", cifar10_root)
    assert raw.train_x.shape == (600, 3, 32, 32) and raw.test_x.shape == (200, 3, 32, 32)
    assert int(raw.train_y.min()) == 0 and int(raw.train_y.max()) == 9
    assert raw.class_names == [f"class{c}" for c in range(10)]
    folder = cifar10_root / "cifar-10-batches-py"
    batches = [_unpickle(folder / f"data_batch_{k}") for k in range(1, 6)]
    assert raw.train_y.tolist() == [y for b in batches for y in b[b"labels"]]
    assert np.array_equal(raw.train_x[-1].numpy().reshape(-1), batches[-1][b"data"][-1])


def test_registry():
    assert DATASETS["cifar10"].num_classes == 10 and DATASETS["cifar10"].per_class_train == 5000
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["cifar100"].per_class_train == 500
    assert set(MEAN) == set(STD) == set(DATASETS)


def test_root_resolution(monkeypatch, tmp_path, cifar10_root):
    monkeypatch.setenv("LTSEARCH_DATA", str(cifar10_root))
    assert resolve_root() == cifar10_root
    assert len(load_split("cifar10").train_y) == 600
    assert resolve_root(tmp_path) == tmp_path  # an explicit root wins over the variable
    monkeypatch.delenv("LTSEARCH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == default_root() == tmp_path / "xdg" / "ltsearch" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root() == tmp_path / "home" / ".cache" / "ltsearch" / "data"


def test_missing_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("cifar100", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and "LTSEARCH_DATA" in msg and "data.download" in msg
    assert "\n" not in msg


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError, match="cifar10, cifar100"):
        load_split("imagenet")
    assert issubclass(DataError, ValueError)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in ``torchvision`` module whose dataset classes record their calls instead of downloading."""
    calls = []
    module = types.SimpleNamespace(datasets=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torchvision", module)

    def install(behaviour):
        def dataset(root, train, download):
            calls.append((root, train, download))
            behaviour(Path(root))
        module.datasets.CIFAR10 = module.datasets.CIFAR100 = dataset
        return calls
    return install


def test_download_when_missing(fake_torchvision, write_cifar_folder, tmp_path):
    calls = fake_torchvision(lambda root: write_cifar_folder("cifar100", root, 25, 2))
    raw = load_split("cifar100", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert raw.train_x.shape == (2500, 3, 32, 32)
    load_split("cifar100", tmp_path, download=True)  # present now: no second download
    assert len(calls) == 1


def test_failed_download_names_where_to_put_the_files(fake_torchvision, tmp_path):
    def offline(root):
        raise OSError("Network is unreachable")
    calls = fake_torchvision(offline)
    with pytest.raises(DataError, match="download") as err:
        load_split("cifar10", tmp_path, download=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and calls
    calls.clear()
    with pytest.raises(DataError):
        load_split("cifar10", tmp_path)  # download=False never tries
    assert calls == []


def _rewrite(path: Path, edit) -> None:
    d = _unpickle(path)
    edit(d)
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _wrong_shape(d):
    d[b"data"] = d[b"data"][:, :3000]


def _wrong_dtype(d):
    d[b"data"] = d[b"data"].astype(np.float32)


def _drop_labels(d):
    del d[b"fine_labels"]


def _short_labels(d):
    d[b"fine_labels"] = d[b"fine_labels"][:-1]


def _bad_label(d):
    d[b"fine_labels"][3] = 100


@pytest.mark.parametrize("edit, what", [
    (_wrong_shape, "3072"), (_wrong_dtype, "uint8"), (_drop_labels, "missing keys"),
    (_short_labels, "labels"), (_bad_label, "out of range"),
])
def test_corrupted_train_file_is_named(cifar100_root, tmp_path, edit, what):
    folder = Path(shutil.copytree(cifar100_root / "cifar-100-python", tmp_path / "cifar-100-python"))
    _rewrite(folder / "train", edit)
    with pytest.raises(DataError, match=what) as err:
        load_split("cifar100", tmp_path)
    assert str(folder / "train") in str(err.value)


def test_truncated_or_missing_file_is_named(cifar10_root, tmp_path):
    folder = Path(shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"))
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(DataError, match="unreadable pickle") as err:
        load_split("cifar10", tmp_path)
    assert str(batch) in str(err.value)
    batch.unlink()
    with pytest.raises(DataError, match="missing") as err:
        load_split("cifar10", tmp_path)
    assert str(batch) in str(err.value)


# ---------------------------------------------------------------- long-tailed dataset

def test_load_longtail_on_synthetic_cifar100(cifar100_root):
    counts = lt_class_counts(25, 100, 5)
    data = load_longtail("cifar100", cifar100_root, imbalance_factor=5, val_per_class=5, n_max=25)
    assert isinstance(data, LongTailData) and data.num_classes == 100
    assert data.class_counts == [min(n, 25) for n in counts] == torch.bincount(data.train_y).tolist()
    assert data.train_x.shape == (sum(data.class_counts), 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert torch.bincount(data.val_y).tolist() == [5] * 100
    assert len(data.test_y) == 500 and len(data.class_names) == 100
    train_rows = {bytes(x.numpy()) for x in data.train_x}  # disjoint images (noise makes them unique)
    assert not train_rows & {bytes(x.numpy()) for x in data.val_x}
    other = load_longtail("cifar100", cifar100_root, imbalance_factor=5, val_per_class=5, n_max=25,
                          subset_seed=3)
    assert other.class_counts == data.class_counts and not torch.equal(other.train_x, data.train_x)


@pytest.mark.e2e
def test_load_longtail_on_real_cifar10(real_cifar10_root):
    data = load_longtail("cifar10", real_cifar10_root, imbalance_factor=100)
    assert data.class_counts[0] == 4980 and data.class_counts[-1] == 50
    assert sum(data.class_counts) == 12406 - 20
    assert torch.bincount(data.val_y).tolist() == [20] * 10
    assert data.test_x.shape == (10000, 3, 32, 32)
    assert data.class_names[0] == "airplane"


# ---------------------------------------------------------------- augmentation

def _find_crop(out: torch.Tensor, image: torch.Tensor, padding: int = 4):
    """Every (dy, dx, flipped) whose window of the zero-padded image equals ``out``."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    h, w = image.shape[1:]
    return [(dy, dx, flipped)
            for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flipped in (False, True)
            if torch.equal(out, padded[:, dy:dy + h, dx:dx + w].flip(2) if flipped
                           else padded[:, dy:dy + h, dx:dx + w])]


def test_random_crop_flip_takes_windows_of_the_padded_image():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    found = [_find_crop(out[i], x[i]) for i in range(12)]
    assert all(len(f) == 1 for f in found)
    flips = {f[0][2] for f in found}
    assert flips == {False, True}
    offsets = {f[0][:2] for f in found}
    assert len(offsets) > 3


def test_random_crop_flip_is_deterministic_per_generator():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(6)))


def test_random_crop_flip_without_padding_only_flips():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


# ---------------------------------------------------------------- loader

def _loader(n=103, batch_size=10, **kw):
    """A loader whose labels are the image indices, so batches reveal the order."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    kw.setdefault("train", True)
    return TensorLoader(images, torch.arange(n), batch_size, MEAN["cifar10"], STD["cifar10"], **kw)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return torch.cat([y for _, y in batches]), torch.cat([x for x, _ in batches])


def test_each_epoch_visits_every_index_once_in_a_new_order():
    loader = _loader()
    (y0, _), (y1, _) = _epoch(loader, 0), _epoch(loader, 1)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == list(range(103))
    assert not torch.equal(y0, y1)
    assert len(loader) == 11


def test_epoch_is_reproducible_from_seed_and_epoch():
    y, x = _epoch(_loader(seed=4), 7)
    y2, x2 = _epoch(_loader(seed=4), 7)  # a fresh loader, as after a resume
    assert torch.equal(y, y2) and torch.equal(x, x2)
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(4 * 100003 + 7))
    assert torch.equal(y, perm)
    assert not torch.equal(y, _epoch(_loader(seed=5), 7)[0])


def test_train_sharding_pads_so_ranks_take_equal_steps():
    ranks = [_loader(rank=r, world_size=2) for r in range(2)]
    ys = [_epoch(loader, 3)[0] for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert len(ys[0]) == len(ys[1]) == 52
    assert set(ys[0].tolist()) | set(ys[1].tolist()) == set(range(103))
    assert len(set(ys[0].tolist()) & set(ys[1].tolist())) == 1  # the one padding duplicate


def test_eval_is_sequential_and_shards_without_duplicates():
    single = _epoch(_loader(train=False), 0)[0]
    assert torch.equal(single, torch.arange(103))
    ys = [_epoch(_loader(train=False, rank=r, world_size=2), 0)[0] for r in range(2)]
    assert sorted(ys[0].tolist() + ys[1].tolist()) == list(range(103))
    assert [len(y) for y in ys] == [52, 51]


def test_drop_last():
    loader = _loader(drop_last=True)
    assert len(loader) == 10 and len(_epoch(loader, 0)[0]) == 100


def test_normalisation_of_a_constant_image_and_channels_last():
    images = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    mean, std = MEAN["cifar100"], STD["cifar100"]
    loader = TensorLoader(images, torch.zeros(4, dtype=torch.int64), 4, mean, std, train=False,
                          channels_last=True)
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1e-6)
    assert loader.images.dtype == torch.uint8


def test_loader_rejects_a_bad_rank():
    with pytest.raises(ValueError):
        _loader(rank=2, world_size=2)


# ---------------------------------------------------------------- samplers

LT_COUNTS = [400, 100, 25, 4]  # 529 images, IF 100


def _lt_labels() -> torch.Tensor:
    """Labels with LT_COUNTS, shuffled (a fixed order), so a class is not a contiguous block of indices."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(LT_COUNTS)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))]


def _class_frequencies(sampler: str, epochs: int = 60) -> torch.Tensor:
    labels = _lt_labels()
    drawn = torch.cat([labels[epoch_indices(labels, sampler, seed=0, epoch=e)] for e in range(epochs)])
    return torch.bincount(drawn, minlength=len(LT_COUNTS)).double() / len(drawn)


def test_registry_of_samplers():
    assert set(SAMPLERS) == {"instance", "class_balanced", "sqrt"}


def test_instance_sampler_is_the_seeded_permutation():
    labels = _lt_labels()
    expected = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3 * 100003 + 5))
    assert torch.equal(epoch_indices(labels, "instance", seed=3, epoch=5), expected)


def test_class_balanced_sampler_draws_classes_uniformly():
    # 60 epochs x 529 draws: the standard error of a frequency near 1/4 is sqrt(0.25 * 0.75 / 31740) = 0.0024
    freq = _class_frequencies("class_balanced")
    assert freq.tolist() == pytest.approx([0.25] * 4, abs=0.012)


def test_sqrt_sampler_draws_classes_by_the_square_root_of_their_counts():
    # sqrt of [400, 100, 25, 4] = [20, 10, 5, 2], summing to 37
    freq = _class_frequencies("sqrt")
    assert freq.tolist() == pytest.approx([20 / 37, 10 / 37, 5 / 37, 2 / 37], abs=0.012)
    # instance sampling keeps the long tail: [400, 100, 25, 4] / 529 exactly, every image once
    assert _class_frequencies("instance", epochs=1).tolist() == pytest.approx([n / 529 for n in LT_COUNTS])


def test_class_balanced_sampler_is_uniform_within_a_class():
    # the 4 images of the rarest class share its quarter: 60 x 529 / 4 / 4 = 1983.75 draws each
    labels = _lt_labels()
    rare = torch.nonzero(labels == 3).flatten()
    drawn = torch.cat([epoch_indices(labels, "class_balanced", seed=0, epoch=e) for e in range(60)])
    per_image = torch.stack([(drawn == i).sum() for i in rare]).double()
    assert per_image.tolist() == pytest.approx([1983.75] * 4, rel=0.08)


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt"])
def test_resampling_is_deterministic_per_seed_and_epoch_and_draws_n(sampler):
    labels = _lt_labels()
    first = epoch_indices(labels, sampler, seed=4, epoch=7)
    assert len(first) == len(labels) and first.dtype == torch.int64
    assert torch.equal(first, epoch_indices(labels.clone(), sampler, seed=4, epoch=7))  # as after a resume
    assert not torch.equal(first, epoch_indices(labels, sampler, seed=4, epoch=8))
    assert not torch.equal(first, epoch_indices(labels, sampler, seed=5, epoch=7))
    assert len(set(first.tolist())) < len(labels)  # with replacement: the rare images repeat


def test_resampling_never_draws_a_class_without_images():
    labels = torch.tensor([0] * 30 + [2] * 3)  # class 1 (and 3, past the largest label) has no image
    drawn = labels[epoch_indices(labels, "class_balanced", seed=0, epoch=0)]
    assert set(drawn.tolist()) <= {0, 2}


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt"])
def test_loader_resamples_with_the_instance_samplers_length(sampler):
    labels = _lt_labels()
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    kw = {"train": True, "seed": 2}
    loader = TensorLoader(images, labels, 50, MEAN["cifar10"], STD["cifar10"], sampler=sampler, **kw)
    instance = TensorLoader(images, labels, 50, MEAN["cifar10"], STD["cifar10"], **kw)
    assert len(loader) == len(instance) == 11
    loader.set_epoch(3)
    drawn = torch.cat([y for _, y in loader])
    assert torch.equal(drawn, labels[epoch_indices(labels, sampler, seed=2, epoch=3)])


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt"])
def test_resampled_epoch_is_sharded_across_ranks(sampler):
    """The two ranks of a DDP run take disjoint positions of one draw (interleaved they are the single-process
    order, padded by its first element to an even length) in the same number of steps."""
    n = 103
    labels = torch.arange(n) % 5
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()  # image i is i

    def positions(rank, world):  # the images a rank trains on: the brightest pixel survives crops (padding is 0)
        loader = TensorLoader(images, labels, 10, MEAN["cifar10"], STD["cifar10"], train=True, seed=1,
                              rank=rank, world_size=world, sampler=sampler)
        loader.set_epoch(4)
        x = torch.cat([x for x, _ in loader])[:, 0].amax(dim=(1, 2))
        return ((x * STD["cifar10"][0] + MEAN["cifar10"][0]) * 255).round().long(), len(loader)

    single, _ = positions(0, 1)
    (r0, steps0), (r1, steps1) = positions(0, 2), positions(1, 2)
    assert steps0 == steps1 == 6 and len(r0) == len(r1) == 52
    padded = torch.cat([single, single[:1]])
    assert torch.equal(r0, padded[0::2]) and torch.equal(r1, padded[1::2])
    assert torch.equal(single, epoch_indices(labels, sampler, seed=1, epoch=4))


def test_unknown_sampler_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="'balanced'.*class_balanced"):
        _loader(sampler="balanced")
    with pytest.raises(ValueError, match="'balanced'"):
        epoch_indices(torch.arange(3), "balanced", 0, 0)


# ---------------------------------------------------------------- one loader entry point for every dataset

def test_tensor_loader_crop_padding_is_a_parameter():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 16, 16)
    loader = TensorLoader(images, torch.arange(2), 2, (0, 0, 0), (1, 1, 1), train=True, padding=0)
    x, y = next(iter(loader))
    for image, label in zip(x, y):  # no padding: each image is itself or its mirror
        original = images[label].float() / 255
        assert torch.allclose(image, original) or torch.allclose(image, original.flip(-1))
    padded = TensorLoader(images, torch.arange(2), 2, (0, 0, 0), (1, 1, 1), train=True, padding=8, seed=1)
    assert (next(iter(padded))[0] == 0).all(dim=1).any()  # a crop of the 8-pixel zero border shows black pixels


def test_split_loader_gives_cifar_its_tensor_loader(cifar10_root):
    from ltsearch.config import ExperimentConfig

    config = ExperimentConfig.model_validate({
        "data": {"dataset": "cifar10", "root": str(cifar10_root), "imbalance_factor": 10, "val_per_class": 5},
        "trainer": {"seed": 7, "channels_last": False}})
    data = load_data(config)
    loader = split_loader(config, data, "train", 16, train=True, sampler="sqrt", rank=1, world_size=2)
    assert isinstance(loader, TensorLoader) and loader.padding == 4 and loader.seed == 7
    assert (loader.sampler, loader.rank, loader.world_size) == ("sqrt", 1, 2)
    expected = TensorLoader(data.train_x, data.train_y, 16, MEAN["cifar10"], STD["cifar10"], train=True, seed=7,
                            sampler="sqrt", rank=1, world_size=2)
    loader.set_epoch(3)
    expected.set_epoch(3)
    for (x, y), (x2, y2) in zip(loader, expected, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    test = split_loader(config, data, "test", 64, train=False)
    assert torch.equal(torch.cat([y for _, y in test]), data.test_y)


def test_normalization_covers_cifar_and_image_datasets():
    assert normalization("cifar100") == {"mean": MEAN["cifar100"], "std": STD["cifar100"]}
    assert normalization("imagenet_lt") == normalization("image_folder") == {
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert normalization("inat2018")["mean"] == (0.466, 0.471, 0.380)
