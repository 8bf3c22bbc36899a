"""Tests of ltsearch.search.loggers: a real search logs to TensorBoard event files and a local MLflow store (SQLite),
and what was logged is read back (end-to-end, local Ray)."""
from __future__ import annotations

import struct

import pandas as pd
import pytest

from ltsearch.space import load_search_space

from .conftest import write_space

pytestmark = pytest.mark.e2e


def _scalars(event_file) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] from a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    data, out, pos = event_file.read_bytes(), {}, 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_search_logs_to_tensorboard_and_mlflow(local_ray, cifar10_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=2, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"num_samples": 2, "scheduler": {"enabled": False}, "loggers": ["tensorboard", "mlflow"]})
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="logged")
    table = pd.read_csv(result.path / "results.csv")
    assert len(table) == 2 and (table["epochs"] == 2).all()

    event_files = sorted((result.path / "search").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 2
    for event_file in event_files:
        scalars = _scalars(event_file)
        assert [step for step, _ in scalars["ray/tune/val_acc"]] == [1, 2]
        assert [value for _, value in scalars["ray/tune/epoch"]] == [1.0, 2.0]

    client = MlflowClient(tracking_uri=f"sqlite:///{result.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logged/search")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    logged = sorted(float(run.data.params["stage1.weight_decay"]) for run in runs)
    assert logged == pytest.approx(sorted(table["stage1.weight_decay"]), rel=1e-6)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]
        assert run.info.status == "FINISHED"
