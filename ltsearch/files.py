"""Files the package writes: the trainer checkpoint's name and atomic writes (a reader, or a process killed
mid-write, sees the old file or the new one, never a partial one)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINT_FILE", "atomic_save", "atomic_write_text"]

CHECKPOINT_FILE = "state.pt"  # inside a checkpoint directory, written by `ltsearch.train`


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
