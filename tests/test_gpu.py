"""Several trials per GPU: fractional `search.resources.gpus_per_worker`, data on the trial's own device, and
the GPU check (`benchmarks/gpu_check.sh`).

Without a GPU: how many fractional-GPU trials fit, the refusal of DDP ranks sharing a GPU, the check's
concurrency measure, and (e2e) the check's CPU dry run end to end. Tests marked `cuda` need a CUDA device
and skip without one; `benchmarks/gpu_check.sh` runs them (`pytest -m cuda tests/test_gpu.py`).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ltsearch.config import ConfigError, ExperimentConfig
from ltsearch.search.resources import trial_resources
from ltsearch.space import SearchSettings, load_search_space

from .conftest import write_space

REPO = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- without a GPU


@pytest.mark.parametrize(("gpus_per_worker", "cpus_per_worker", "cluster", "concurrent"), [
    (0.25, 1, {"CPU": 16.0, "GPU": 1.0}, 4),  # a quarter of a GPU each: 4 trials per GPU
    (0.25, 1, {"CPU": 16.0, "GPU": 2.0}, 8),
    (0.25, 1, {"CPU": 2.0, "GPU": 1.0}, 2),  # the CPUs bind first
    (0.25, 0.5, {"CPU": 2.0, "GPU": 1.0}, 4),  # the GPU check's dry run
    (1 / 3, 1, {"CPU": 16.0, "GPU": 1.0}, 3),  # 3 x (1/3) fits despite rounding
    (0.3, 1, {"CPU": 16.0, "GPU": 1.0}, 3),
    (0.5, 2, {"CPU": 16.0, "GPU": 4.0}, 8),
])
def test_fractional_gpus_set_the_trials_per_gpu(gpus_per_worker, cpus_per_worker, cluster, concurrent):
    settings = SearchSettings.model_validate(
        {"resources": {"gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker}})
    worker, fits = trial_resources(settings, cluster)
    assert worker == {"CPU": cpus_per_worker, "GPU": gpus_per_worker} and fits == concurrent


def test_max_concurrent_caps_fractional_packing():
    settings = SearchSettings.model_validate({"resources": {"gpus_per_worker": 0.25}, "max_concurrent": 3})
    assert trial_resources(settings, {"CPU": 16.0, "GPU": 1.0})[1] == 3


def test_ddp_ranks_sharing_a_gpu_are_refused_when_the_file_loads(tmp_path, cifar10_root):
    """Ray packs fractional-GPU ranks of one trial on one GPU, where NCCL fails ('Duplicate GPU detected')."""
    path = write_space(tmp_path / "s.yaml", cifar10_root, space={"stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
                       search={"resources": {"num_workers": 2, "gpus_per_worker": 0.5}})
    with pytest.raises(ConfigError, match=r"search.resources: .*DDP ranks cannot share a GPU"):
        load_search_space(path)
    SearchSettings.model_validate({"resources": {"num_workers": 2, "gpus_per_worker": 1}})  # whole GPUs: fine


def test_peak_concurrency_of_the_gpu_check():
    history = pd.DataFrame({  # trial a runs 0-10 s, b 2-6 s, c 5-9 s, d 11-12 s: at most 3 at once
        "trial_id": ["a", "a", "b", "c", "c", "d"], "timestamp": [5, 10, 6, 7, 9, 12],
        "time_total_s": [5, 10, 4, 2, 4, 1]})
    assert _gpu_check_module().peak_concurrency(history) == 3


@pytest.mark.e2e
def test_gpu_check_dry_run_passes(tmp_path):
    """`benchmarks/gpu_check.sh --dry-run`: the check's every step, tiny, on the CPU (about 2 minutes here):
    throughput in fp32 and bf16, 4 quarter-GPU trials at once on a Ray told it has one GPU, the CUDA tests
    (skipped)."""
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, check=False,
                         env={**os.environ, "WORK": str(tmp_path), "PYTHON": sys.executable})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "| 32 | fp32 |" in out and "| 32 | bf16 |" in out and "packed: 2 processes" in out
    assert "search check passed: 4 trials shared 1 GPU(s) at once (4 expected), each on ['cpu']" in out
    assert "skipped" in out and "gpu_check: all steps passed" in out


# ---------------------------------------------------------------------------- on a CUDA device


def _cuda_config(root, **overrides) -> ExperimentConfig:
    from ltsearch.config import with_overrides

    base = ExperimentConfig.model_validate({
        "data": {"dataset": "cifar10", "root": str(root), "imbalance_factor": 10, "val_per_class": 5},
        "model": {"name": "resnet8"},
        "stage1": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "stage2": {"epochs": 2, "batch_size": 32},
        "trainer": {"eval_batch_size": 64, "device": "cuda"},
    })
    return with_overrides(base, overrides)


@pytest.mark.cuda
@requires_cuda
def test_trainer_keeps_images_model_and_eval_features_on_the_cuda_device(cifar10_root, monkeypatch):
    from ltsearch.data import TensorLoader
    from ltsearch.train import train

    seen, iterate = [], TensorLoader.__iter__

    def recorded(self):  # every loader the trainer iterates: training batches and eval splits
        for x, y in iterate(self):
            seen.append((self.train, self.images.device.type, x.device.type, y.device.type))
            yield x, y

    monkeypatch.setattr(TensorLoader, "__iter__", recorded)
    states = []
    summary = train(_cuda_config(cifar10_root),
                    report=lambda m, ckpt: states.append(torch.load(f"{ckpt}/state.pt", weights_only=False)))
    assert {train_batch for train_batch, *_ in seen} == {True, False}
    assert {device for _, *devices in seen for device in devices} == {"cuda"}  # uint8 images kept on the GPU
    assert [h["device"] for h in summary["history"]] == [f"cuda:{torch.cuda.current_device()}"] * 4
    assert all(math.isfinite(h["train_loss"]) for h in summary["history"])
    assert summary["stage2"]["final"]["test_acc"] is not None and summary["stage1"]["best"]["test_acc"] is not None
    assert all(t.device.type == "cuda" for t in states[-1]["model"].values())


@pytest.mark.cuda
@requires_cuda
def test_resume_on_cuda_continues_from_a_mid_run_checkpoint(cifar10_root, tmp_path):
    from ltsearch.train import train

    from .test_train import checkpoint_after

    config = _cuda_config(cifar10_root)
    resumed = train(config, resume_from=checkpoint_after(config, 2, tmp_path / "ckpt"))  # the checkpoint's CUDA tensors, loaded on CUDA
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert {h["device"] for h in resumed["history"]} == {f"cuda:{torch.cuda.current_device()}"}
    assert resumed["stage2"]["final"]["test_acc"] is not None


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_close_to_fp32(cifar10_root, precision):
    from ltsearch.train import train

    one_epoch = {"stage1.epochs": 1, "stage2.enabled": False}
    fp32 = train(_cuda_config(cifar10_root, **one_epoch, **{"trainer.precision": "fp32"}))
    mixed = train(_cuda_config(cifar10_root, **one_epoch, **{"trainer.precision": precision}))
    assert {h["precision"] for h in mixed["history"]} == {precision}
    for a, b in zip(mixed["history"], fp32["history"], strict=True):
        assert math.isfinite(a["train_loss"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=0.2)


@pytest.fixture
def local_gpu_ray():
    import ray

    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.cuda
@requires_cuda
def test_four_quarter_gpu_trials_share_one_gpu_at_once(local_gpu_ray, cifar10_root, tmp_path):
    """`gpus_per_worker: 0.25`: four one-worker trials on one GPU at the same time, each training on it."""
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=8, stage2_epochs=1,  # a few s each
                       space={"stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
                       search={"num_samples": 4, "scheduler": {"enabled": False},
                               "resources": {"cpus_per_worker": 1, "gpus_per_worker": 0.25}})
    gpus = local_gpu_ray.cluster_resources().get("GPU", 0)
    cpus = local_gpu_ray.cluster_resources().get("CPU", 0)
    if cpus < 4:
        pytest.skip(f"4 one-CPU trials need 4 CPUs, this machine has {cpus:g}")
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="quarter")
    history = pd.read_csv(result.path / "history.csv", dtype={"trial_id": str})
    assert (result.results["status"] != "ERROR").all() and len(result.results) == 4
    assert set(history["device"]) == {"cuda:0"}  # Ray gives each trial its GPU as CUDA_VISIBLE_DEVICES
    expected = min(4, math.floor(gpus / 0.25))
    assert _gpu_check_module().peak_concurrency(history) == expected
