"""Faults a cluster inflicts on a search, each on a real local Ray run by run_search.py in a subprocess:
a killed worker, a killed driver, a lost node, a diverging configuration, a GPU request without GPUs.
No in-process Ray here (see test_cluster.py for why one Ray instance at a time)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
import torch

from .conftest import two_node_cluster, write_space

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def _cmd(space: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_search.py"), str(space), "--storage", str(storage), "--name", name, *extra]


def _epochs(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def _wait(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the search ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting to inject the fault"
        time.sleep(0.3)


def _kill_session_of(driver_pid: int) -> None:
    """Kill what a SIGKILLed driver leaves behind: its local Ray's daemons (their session folder name
    ends with the driver's pid), as `ray stop` would but without touching other Ray instances."""
    marker = f"_{driver_pid}"
    victims = [p for p in psutil.process_iter(["cmdline"])
               if any("session_" in part and (part.endswith(marker) or f"{marker}/" in part)
                      for part in p.info["cmdline"] or [])]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=10)


def _kill_ray_processes(title: str) -> int:
    """SIGKILL the processes whose title (Ray sets `ray::<Actor>.<method>`) starts with `title`."""
    victims = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith(title)]
    for p in victims:
        p.kill()
    return len(victims)


@pytest.mark.parametrize(("workers", "victim"), [(1, "ray::ImplicitFunc"), (2, "ray::RayTrainWorker")])
def test_killed_worker_resumes_from_its_checkpoint(cifar10_root, tmp_path, workers, victim):
    space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=5, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"num_samples": 1, "resources": {"num_workers": workers, "cpus_per_worker": 1}})
    proc = subprocess.Popen(_cmd(space, tmp_path / "runs", "kill"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    search = tmp_path / "runs" / "kill" / "search"
    _wait(lambda: any(2 in _epochs(d) for d in search.glob("trial_*")), proc)
    assert _kill_ray_processes(victim) >= 1
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    (trial,) = search.glob("trial_*")
    assert _epochs(trial) == [1, 2, 3, 4, 5]  # nothing lost, nothing repeated
    table = pd.read_csv(tmp_path / "runs" / "kill" / "results.csv")
    assert table.loc[0, "stop_reason"] == "completed"


def test_driver_killed_then_resumed(cifar10_root, tmp_path):
    """SIGKILL of run_search.py after two finished trials; --resume keeps them, runs the rest once, and
    the Optuna study ends with exactly the trials asked for. Then the results table is rebuilt from
    Ray's files when it is lost."""
    space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=3, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"num_samples": 5, "max_concurrent": 1, "scheduler": {"enabled": False}})
    cmd = _cmd(space, tmp_path / "runs", "sigkill")
    exp = tmp_path / "runs" / "sigkill"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait(lambda: sum(_epochs(d)[-1:] == [3] for d in (exp / "search").glob("trial_*")) >= 2, proc)
    time.sleep(4)  # Tune saves its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_session_of(proc.pid)
    finished = {d.name: _epochs(d) for d in (exp / "search").glob("trial_*") if _epochs(d)[-1:] == [3]}

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    folders = {d.name: _epochs(d) for d in (exp / "search").glob("trial_*")}
    # A trial launched in the last ~2 s before the kill (after Tune's last saved state) leaves an empty
    # folder; Optuna marks it failed and the search runs a replacement.
    trials = {name: epochs for name, epochs in folders.items() if epochs}
    assert len(folders) - len(trials) <= 1, folders
    assert len(trials) == 5 and all(epochs == [1, 2, 3] for epochs in trials.values())
    assert {name: trials[name] for name in finished} == finished
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{exp / 'optuna.db'}")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 5

    table = pd.read_csv(exp / "results.csv")
    (exp / "results.csv").unlink()
    (exp / "history.csv").unlink()
    rebuilt = subprocess.run(cmd + ["--resume"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    again = pd.read_csv(exp / "results.csv")
    pd.testing.assert_frame_equal(table.sort_values("trial_id").reset_index(drop=True),
                                  again.sort_values("trial_id").reset_index(drop=True))
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        secret = token.read_text().strip()
        assert secret not in resumed.stdout + resumed.stderr
        assert all(secret not in p.read_text() for p in exp.glob("*.csv"))


def test_diverging_trial_ends_with_a_reason_and_the_search_goes_on(cifar10_root, tmp_path):
    space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=3, space={
        "stage1.lr": {"choice": [0.05, 1.0e12]}},
        search={"num_samples": 4, "sampler": {"type": "random", "seed": 7}, "scheduler": {"enabled": False}})
    run = subprocess.run(_cmd(space, tmp_path / "runs", "nan"), cwd=tmp_path, check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "runs" / "nan" / "results.csv")
    diverged = table[table["stage1.lr"] > 1]
    assert len(table) == 4 and 1 <= len(diverged) < 4  # seed 7 samples both learning rates
    assert diverged["stop_reason"].str.contains("diverged: stage 1 epoch 1: training loss is nan").all()
    assert (table.loc[table["stage1.lr"] < 1, "stop_reason"] == "completed").all()
    assert "Ray dashboard: http://127.0.0.1:" in run.stdout  # dashboard on loopback
    assert "`ray get-auth-token` prints it" in run.stdout and "auth_token" in run.stdout  # what its prompt wants
    # No retries: each diverged trial ran one epoch once; Optuna records it as failed.
    history = pd.read_csv(tmp_path / "runs" / "nan" / "history.csv")
    assert (history[history["trial_id"].isin(diverged["trial_id"])].groupby("trial_id").size() == 1).all()
    states = [t.state.name for t in optuna.load_study(
        study_name="search", storage=f"sqlite:///{tmp_path / 'runs' / 'nan' / 'optuna.db'}").trials]
    assert states.count("FAIL") == len(diverged) and states.count("COMPLETE") == 4 - len(diverged)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_request_on_a_cluster_without_gpus(cifar10_root, tmp_path):
    space = write_space(tmp_path / "s.yaml", cifar10_root, space={"stage1.weight_decay": {"uniform": [0, 0.1]}},
                        search={"resources": {"gpus_per_worker": 1}})
    run = subprocess.run(_cmd(space, tmp_path / "runs", "gpu"), cwd=tmp_path, check=False, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: search.resources.gpus_per_worker")
    assert not (tmp_path / "runs" / "gpu").exists()  # refused before the experiment folder is made


def test_lost_node_trials_retried_on_the_remaining_node(cifar10_root, tmp_path):
    with two_node_cluster(tmp_path) as (address, env, node_manager_port):
        space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=6, space={
            "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
            search={"num_samples": 2, "scheduler": {"enabled": False}, "max_failures": 3})
        proc = subprocess.Popen(_cmd(space, tmp_path / "runs", "node", "--address", address),
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        search = tmp_path / "runs" / "node" / "search"
        _wait(lambda: sum(len(_epochs(d)) >= 2 for d in search.glob("trial_*")) == 2, proc)
        raylet = next(p for p in psutil.process_iter(["cmdline"])
                      if "raylet" in " ".join(p.info["cmdline"] or [])
                      and f"--node_manager_port={node_manager_port}" in p.info["cmdline"])
        for p in [*raylet.children(recursive=True), raylet]:  # the node and every worker on it
            p.kill()
        out, _ = proc.communicate(timeout=500)
        assert proc.returncode == 0, out[-3000:]
    table = pd.read_csv(tmp_path / "runs" / "node" / "results.csv")
    assert len(table) == 2 and (table["stop_reason"] == "completed").all()
    assert all(_epochs(d)[-1] == 6 for d in search.glob("trial_*"))
