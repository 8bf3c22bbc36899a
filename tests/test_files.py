"""Atomic writes (ltsearch/files.py): a writer SIGKILLed at a random moment while it rewrites a large file
leaves the old content or the new one, never a part of either."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ltsearch.files import atomic_save, atomic_write_text

SIZE = 1_000_000  # characters (or float32 values) per version

# Rewrites the file forever, versions start, start + 1, ...: each is its number and a payload made from it.
WRITER = """
import itertools, sys, torch
from ltsearch.files import atomic_save, atomic_write_text
kind, path, size, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for version in itertools.count(start):
    if kind == "text":
        atomic_write_text(path, f"{version}\\n" + chr(65 + version % 26) * size + "\\nend\\n")
    else:
        atomic_save({"version": version, "payload": torch.full((size,), float(version))}, path)
"""


def _version(kind: str, path: Path, size: int = SIZE) -> int:
    """The version a whole file holds; fails on a partial or mixed one."""
    if kind == "text":
        head, payload, end = path.read_text().split("\n")[:3]
        version = int(head)
        assert payload == chr(65 + version % 26) * size and end == "end"
        return version
    state = torch.load(path, weights_only=True)
    assert state["payload"].shape == (size,) and (state["payload"] == state["version"]).all()
    return state["version"]


def _stop_while_writing(writer: subprocess.Popen, tmp: Path) -> None:
    """Freeze `writer` (SIGSTOP) at a moment its temporary file exists: between the start of a version's
    write and its rename. (A kill at any moment lands there only part of the time.)"""
    while True:
        assert writer.poll() is None
        if tmp.exists():
            writer.send_signal(signal.SIGSTOP)
            process = psutil.Process(writer.pid)
            while process.status() != psutil.STATUS_STOPPED:
                time.sleep(0.001)
            if tmp.exists():
                return
            writer.send_signal(signal.SIGCONT)
        time.sleep(0.001)


@pytest.mark.parametrize("kind", ["text", "torch"])
def test_a_writer_killed_mid_write_leaves_the_old_or_the_new_file(tmp_path, kind):
    """Four writers, each SIGKILLed after a random delay once it is in the middle of writing a version:
    the file then holds the last version written before, whole."""
    path = tmp_path / ("table.csv" if kind == "text" else "state.pt")
    tmp = path.with_name(path.name + ".tmp")
    rng = random.Random(0)
    seen = -1
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), str(SIZE), str(seen + 1)])
        deadline = time.time() + 120
        while (not path.exists() or _version(kind, path) <= seen) and writer.poll() is None:
            assert time.time() < deadline, "the writer wrote no new version"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        _stop_while_writing(writer, tmp)
        writer.send_signal(signal.SIGKILL)
        assert writer.wait() == -signal.SIGKILL
        assert tmp.exists()  # the next version, cut off
        seen = _version(kind, path)  # the last version it finished, whole


@pytest.mark.parametrize("kind", ["text", "torch"])
def test_the_version_check_catches_a_partial_file(tmp_path, kind):
    """What the test above would see from a writer without the temporary file: a cut-off file fails."""
    path = tmp_path / "f"
    if kind == "text":
        atomic_write_text(path, "3\n" + "D" * 1000 + "\nend\n")
    else:
        atomic_save({"version": 3, "payload": torch.full((1000,), 3.0)}, path)
    assert _version(kind, path, size=1000) == 3
    path.write_bytes(path.read_bytes()[:-600])
    with pytest.raises((AssertionError, OSError, RuntimeError, ValueError)):  # wrong payload, short file, bad zip
        _version(kind, path, size=1000)
