"""Shared fixtures and helpers: small SYNTHETIC CIFAR folders in the official python-version layouts, search-space
files on them (`write_space`) and a two-node Ray cluster of the test's own (`two_node_cluster`).

Unit tests never read real data and never touch the network. End-to-end tests use real CIFAR-10 through
``real_cifar10_root``: ``$LTSEARCH_DATA`` when it holds ``cifar-10-batches-py``, else a copy that
``../shared/data/make_cifar10.py`` (next to this repository) decodes into a session tmp dir in about 7 s;
without either the test is skipped. CIFAR-100 is not available offline, so its code paths run on the
generated folders only.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from .servers import postgres_server, s3_server  # noqa: F401 (fixtures)

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


def write_space(path: Path, root: Path, *, space: dict, search: dict, stage1_epochs=4, stage2_epochs=0) -> Path:
    base = {
        "data": {"dataset": "cifar10", "root": str(root), "imbalance_factor": 10, "val_per_class": 5},
        "model": {"name": "resnet8"},
        "stage1": {"epochs": stage1_epochs, "batch_size": 64, "lr": 0.05},
        "stage2": {"enabled": stage2_epochs > 0, "epochs": max(stage2_epochs, 1), "batch_size": 64},
        "trainer": {"eval_batch_size": 256},
    }
    path.write_text(yaml.safe_dump({"base": base, "space": space, "search": search}))
    return path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_cluster(temp_dir: str) -> None:
    """Kill only the Ray processes of the cluster whose temp dir is `temp_dir` (`ray stop` kills them all)."""
    victims = {}
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            victims[proc.pid] = proc
            try:  # the agents a raylet starts rename themselves (ray::DashboardAgent): found as its children
                victims.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    for proc in victims.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(victims.values()), timeout=10)


def _ray_start(args: list[str], env: dict) -> None:
    proc = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", *args], env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"ray start {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@contextlib.contextmanager
def two_node_cluster(tmp_path: Path, extra_env: dict | None = None):
    """A head and a second node of 1 CPU each on loopback, with their own ports, temp dir and auth token.
    Yields (GCS address, env for processes that use the cluster, the second node's node-manager port);
    stops only this cluster's processes afterwards. `extra_env` reaches the cluster's workers (object-storage
    credentials); the env's RAY_API_SERVER_ADDRESS is the dashboard's job API (`ray job submit`)."""
    temp_dir = f"/tmp/ltsr{os.getpid()}"  # short: Ray's unix sockets live under it
    gcs, dashboard, client, head_mgr, head_obj, node_mgr, node_obj = _free_ports(7)
    token = tmp_path / "auth_token"  # token authentication stays on, with a token of the test's own
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs}",  # what the cluster's own workers connect to
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", **(extra_env or {})}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]

    def agent_ports() -> list[str]:  # each node's agents on ports of their own (two nodes on one machine)
        listen, grpc, runtime_env, metrics = _free_ports(4)
        return ["--dashboard-agent-listen-port", str(listen), "--dashboard-agent-grpc-port", str(grpc),
                "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics)]

    try:
        _ray_start(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    str(dashboard), "--ray-client-server-port", str(client), "--temp-dir", temp_dir,
                    "--node-manager-port", str(head_mgr), "--object-manager-port", str(head_obj), *agent_ports(),
                    *common], env)
        _ray_start(["--address", f"127.0.0.1:{gcs}", "--node-manager-port", str(node_mgr),
                    "--object-manager-port", str(node_obj), *agent_ports(), *common], env)
        yield f"127.0.0.1:{gcs}", env, node_mgr
    finally:
        _stop_cluster(temp_dir)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray started in this process for the module's tests (2 CPUs, dashboard on loopback)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()
