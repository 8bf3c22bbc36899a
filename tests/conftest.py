"""Shared fixtures: small SYNTHETIC CIFAR folders in the official python-version layouts.

Unit tests never read real data and never touch the network. End-to-end tests use real CIFAR-10 through
``real_cifar10_root``: ``$LTSEARCH_DATA`` when it holds ``cifar-10-batches-py``, else a copy that
``../shared/data/make_cifar10.py`` (next to this repository) decodes into a session tmp dir in about 7 s;
without either the test is skipped. CIFAR-100 is not available offline, so its code paths run on the
generated folders only.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE_CIFAR10 = REPO.parent / "shared" / "data" / "make_cifar10.py"


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072) noise around a per-class colour, so the classes are learnable."""
    colours = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))
    noise = rng.normal(0, 25, size=(len(labels), 3, 1024))
    return np.clip(colours[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def write_cifar(name: str, root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Write a synthetic ``cifar10`` or ``cifar100`` folder under ``root``; return the folder."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        train_y = _labels(10, train_per_class, rng)
        for k, part in enumerate(np.array_split(np.arange(len(train_y)), 5)):
            y = train_y[part]
            _dump(folder / f"data_batch_{k + 1}", {
                b"batch_label": f"training batch {k + 1} of 5".encode(), b"data": _images(y, 10, rng),
                b"labels": y.tolist(), b"filenames": [f"img_{i}.png".encode() for i in part]})
        test_y = _labels(10, test_per_class, rng)
        _dump(folder / "test_batch", {
            b"batch_label": b"testing batch 1 of 1", b"data": _images(test_y, 10, rng),
            b"labels": test_y.tolist(), b"filenames": [f"test_{i}.png".encode() for i in range(len(test_y))]})
        _dump(folder / "batches.meta", {b"label_names": [f"class{c}".encode() for c in range(10)],
                                        b"num_cases_per_batch": len(train_y) // 5, b"num_vis": 3072})
        return folder
    if name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            fine = _labels(100, per_class, rng)
            _dump(folder / split, {
                b"filenames": [f"{split}_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{split}ing batch 1 of 1".encode(), b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(), b"data": _images(fine, 100, rng)})
        _dump(folder / "meta", {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
                                b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})
        return folder
    raise ValueError(name)


@pytest.fixture(scope="session")
def write_cifar_folder():
    """The writer itself, for tests that need a fresh folder (e.g. a fake download)."""
    return write_cifar


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    """Root holding a synthetic ``cifar-100-python``: 100 classes x 30 train / 5 test images."""
    root = tmp_path_factory.mktemp("c100")
    write_cifar("cifar100", root, train_per_class=30, test_per_class=5)
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """Root holding a synthetic ``cifar-10-batches-py``: 10 classes x 60 train / 20 test images."""
    root = tmp_path_factory.mktemp("c10")
    write_cifar("cifar10", root, train_per_class=60, test_per_class=20)
    return root


@pytest.fixture(scope="session")
def real_cifar10_root(tmp_path_factory) -> Path:
    """Root holding real CIFAR-10 (``$LTSEARCH_DATA``, else decoded from shared/data), or skip."""
    env = os.environ.get("LTSEARCH_DATA")
    if env and (Path(env) / "cifar-10-batches-py").is_dir():
        return Path(env)
    if not MAKE_CIFAR10.is_file():
        pytest.skip(f"no real CIFAR-10: set LTSEARCH_DATA or provide {MAKE_CIFAR10}")
    root = tmp_path_factory.mktemp("real_cifar10")
    subprocess.run([sys.executable, str(MAKE_CIFAR10), str(root)], check=True, capture_output=True)
    return root
