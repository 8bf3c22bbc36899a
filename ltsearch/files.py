"""Files the package writes: the trainer checkpoint's name and atomic writes (a reader, or a process killed
mid-write, sees the old file or the new one, never a partial one)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINT_FILE", "PREDICTIONS_FILE", "atomic_save", "atomic_save_array", "atomic_write_text"]

CHECKPOINT_FILE = "state.pt"  # inside a checkpoint directory, written by `ltsearch.train`
# Beside it: per-image validation correctness, packed bits (`selection.pack_correct`), shape (2, 2, bytes):
# [the checkpoint's epoch, the stage's best-by-validation epoch] x [classifier, tau-normalised]
PREDICTIONS_FILE = "val_predictions.npy"


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj, path: str | Path) -> None:
    """`torch.save` to `path` through a temporary file in the same folder."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_array(array, path: str | Path) -> None:
    """`numpy.save` to `path` through a temporary file in the same folder."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
