"""Searches through run_search.py in subprocesses: on a two-node Ray cluster started by the test (its own
ports and temp dir, stopped by the test) and interrupted then resumed. Kept apart from test_search.py,
whose in-process Ray must not run at the same time (a second Ray instance on the machine confuses Ray
Train's placement-group cleaner, which connects to "the" local instance)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import two_node_cluster, write_space

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def test_search_on_a_two_node_cluster_through_address(cifar10_root, tmp_path):
    with two_node_cluster(tmp_path) as (address, env, _):
        path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=2, space={
            "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
            search={"num_samples": 2, "resources": {"num_workers": 2, "cpus_per_worker": 1}})
        proc = subprocess.run([sys.executable, str(REPO / "run_search.py"), str(path), "--address", address,
                               "--storage", str(tmp_path / "runs"), "--name", "cluster"],
                              env=env, check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "runs" / "cluster" / "results.csv")
    assert len(table) == 2 and (table["stop_reason"] == "completed").all()
    history = pd.read_csv(tmp_path / "runs" / "cluster" / "history.csv")
    assert (history["world_size"] == 2).all()  # two ranks: one per node (1 CPU each)


def _finished_trials(search_dir: Path, epochs: int) -> dict[str, int]:
    """Trial folder -> lines in its result.json, for trials that reported their last epoch."""
    done = {}
    for result in search_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("epoch") == epochs:
            done[result.parent.name] = len(lines)
    return done


def test_resume_after_interrupt_does_not_repeat_finished_trials(cifar10_root, tmp_path):
    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=3, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"num_samples": 5, "max_concurrent": 1, "scheduler": {"enabled": False}})
    cmd = [sys.executable, str(REPO / "run_search.py"), str(path), "--storage", str(tmp_path / "runs"),
           "--name", "resume"]
    search_dir = tmp_path / "runs" / "resume" / "search"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_finished_trials(search_dir, 3)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    # every trial whose last epoch is recorded once the search stopped, one that reported it while the
    # search shut down included (Tune may not have taken its checkpoint yet: RegisterReportedCheckpoints)
    before = _finished_trials(search_dir, 3)
    assert 2 <= len(before) < 5

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _finished_trials(search_dir, 3)
    assert len(after) == 5
    assert {name: after[name] for name in before} == before  # finished trials were not run again
    for result in search_dir.glob("*/result.json"):  # no epoch of any trial trained twice
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines() if line.strip()]
        assert sorted(epochs) == [1, 2, 3], (result.parent.name, epochs)
    table = pd.read_csv(tmp_path / "runs" / "resume" / "results.csv")
    assert len(table) == 5 and (table["stop_reason"] == "completed").all()
    history = pd.read_csv(tmp_path / "runs" / "resume" / "history.csv")
    assert not history.duplicated(["trial_id", "epoch"]).any()
