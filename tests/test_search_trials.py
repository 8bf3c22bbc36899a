"""The Tune trainable's records: an epoch's result and its checkpoint stay one record across an interrupt.

Tune takes a reported epoch in two steps, its result (result.json, the trial's `last_result`) and then a
separate save that registers its checkpoint; an interrupt between the two made a resumed trial train that
epoch again. `register_reported_checkpoint` is checked with a stand-in trial on a local folder and on an S3
store, then in real Tune runs interrupted in exactly that window and restored."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import torch
from ray import tune

from ltsearch.files import CHECKPOINT_FILE
from ltsearch.search.trials import _train_and_report, register_reported_checkpoint

from .test_train import small_config

REPO = Path(__file__).resolve().parents[1]


class _Trial(SimpleNamespace):
    """What `register_reported_checkpoint` uses of a Tune trial; `on_checkpoint` records what Tune's save
    would have registered."""

    def on_checkpoint(self, training_result) -> None:
        self.registered.append(training_result)


def _trial(fs, trial_path: str, last_epoch: int | None, registered_epoch: int | None, written: list[int]) -> _Trial:
    """A trial whose epochs `written` have checkpoint folders (checkpoint_{epoch-1:06d}) in `trial_path`."""
    for epoch in written:
        folder = f"{trial_path}/checkpoint_{epoch - 1:06d}"
        fs.create_dir(folder)
        with fs.open_output_stream(f"{folder}/{CHECKPOINT_FILE}") as out:
            out.write(json.dumps({"epoch": epoch}).encode())
    last = {} if last_epoch is None else {"epoch": last_epoch, "checkpoint_dir_name": f"checkpoint_{last_epoch - 1:06d}"}
    current = None
    if registered_epoch is not None:
        current = SimpleNamespace(path=f"{trial_path}/checkpoint_{registered_epoch - 1:06d}")
    return _Trial(last_result=last, checkpoint=current, registered=[],
                  storage=SimpleNamespace(storage_filesystem=fs, trial_fs_path=trial_path))


def _check_register(fs, root: str) -> None:
    # Ctrl-C after the final epoch's result (epoch 3 in result.json), before Tune's save took its checkpoint
    t = _trial(fs, f"{root}/a", last_epoch=3, registered_epoch=2, written=[2, 3])
    assert register_reported_checkpoint(t)
    (result,) = t.registered
    assert result.checkpoint.path == f"{root}/a/checkpoint_000002" and result.metrics["epoch"] == 3
    assert result.checkpoint.filesystem is fs
    with result.checkpoint.as_directory() as folder:
        assert json.loads((Path(folder) / CHECKPOINT_FILE).read_text()) == {"epoch": 3}
    # ... or after the first epoch's result, before any checkpoint was registered
    t = _trial(fs, f"{root}/b", last_epoch=1, registered_epoch=None, written=[1])
    assert register_reported_checkpoint(t) and t.registered[0].checkpoint.path.endswith("/b/checkpoint_000000")
    # result and checkpoint already one record; an older result (restored from a later checkpoint)
    for last, registered in ((3, 3), (2, 3)):
        t = _trial(fs, f"{root}/c{last}", last_epoch=last, registered_epoch=registered, written=[2, 3])
        assert not register_reported_checkpoint(t) and t.registered == []
    # the named checkpoint is not in the trial's folder (or has no checkpoint file): Tune's choice stands
    t = _trial(fs, f"{root}/d", last_epoch=3, registered_epoch=2, written=[2])
    fs.create_dir(f"{root}/d/checkpoint_000002")
    assert not register_reported_checkpoint(t) and t.registered == []
    # no checkpoint named (a multi-worker trial reports Ray Train's checkpoints to Tune as a path), no result
    t = _trial(fs, f"{root}/e", last_epoch=3, registered_epoch=2, written=[2, 3])
    t.last_result["checkpoint_dir_name"] = None
    assert not register_reported_checkpoint(t)
    assert not register_reported_checkpoint(_trial(fs, f"{root}/f", None, None, []))
    # a hard kill: the saved state names a checkpoint keep_checkpoints deleted since: the newest complete one
    t = _trial(fs, f"{root}/g", last_epoch=1, registered_epoch=1, written=[2, 3])
    fs.create_dir(f"{root}/g/checkpoint_000003")  # being written when the driver died: no checkpoint file
    assert register_reported_checkpoint(t) and t.registered[0].checkpoint.path == f"{root}/g/checkpoint_000002"


def test_the_checkpoint_of_the_last_recorded_result_is_registered_in_a_local_folder(tmp_path):
    _check_register(pyarrow.fs.LocalFileSystem(), str(tmp_path))


@pytest.mark.storage
def test_the_checkpoint_of_the_last_recorded_result_is_registered_in_object_storage(s3_server):
    _check_register(s3_server.filesystem(), s3_server.uri("unit/register-checkpoint").removeprefix("s3://"))



def test_a_trial_restored_from_its_final_checkpoint_reports_nothing(cifar10_root, tmp_path):
    """The trainable's side of the record: each checkpoint holds its epoch's result (`history[-1]`); restored
    from the checkpoint of the final epoch (what `RegisterReportedCheckpoints` hands back) it trains and
    reports nothing; restored from the end of stage 1 it reports stage 2's epochs only."""
    config = small_config(cifar10_root)  # stage 1 and stage 2, two epochs each
    reported, saved = [], []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        reported.append(metrics)
        saved.append(shutil.copytree(checkpoint_dir, tmp_path / f"epoch{metrics['epoch']}"))

    _train_and_report(config, report, None, ["val_acc"])
    assert [m["epoch"] for m in reported] == [1, 2, 3, 4] and reported[-1]["total_epochs"] == 4
    for metrics, folder in zip(reported, saved):
        last = torch.load(folder / CHECKPOINT_FILE, weights_only=False)["history"][-1]
        assert last == {k: v for k, v in metrics.items() if k in last} and last["epoch"] == metrics["epoch"]

    again = []
    _train_and_report(config, lambda m, c: again.append(m["epoch"]), tune.Checkpoint.from_directory(saved[3]),
                      ["val_acc"])
    assert again == []
    _train_and_report(config, lambda m, c: again.append(m["epoch"]), tune.Checkpoint.from_directory(saved[1]),
                      ["val_acc"])
    assert again == [3, 4]

# A real Tune run of a toy trainable (3 epochs, a checkpoint each, resumed as ltsearch's trainer resumes: a
# checkpoint of the final epoch trains nothing), interrupted by SIGINT from a driver callback on the final
# epoch's result: after the result is recorded and before Tune's save of its checkpoint is processed. Then
# Tuner.restore, in the same process. Prints, per variant, the epochs of result.json, the epoch of the
# checkpoint the restored trial got, and the restored run's final result and checkpoint.
_WINDOW = r'''
import json, os, signal, sys, tempfile
import pyarrow.fs
import ray
from ray import tune
from ltsearch.files import CHECKPOINT_FILE
from ltsearch.search.trials import RegisterReportedCheckpoints

storage, events = sys.argv[1], sys.argv[2]
variants = sys.argv[3:]
EPOCHS = 3
interrupted = set()


def toy(config):
    checkpoint, start = tune.get_checkpoint(), 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.load(open(os.path.join(folder, CHECKPOINT_FILE)))["epoch"]
        with open(config["events"], "a") as out:
            out.write(json.dumps({"variant": config["variant"], "resumed_from": start}) + "\n")
    for epoch in range(start + 1, EPOCHS + 1):
        with tempfile.TemporaryDirectory() as folder:
            json.dump({"epoch": epoch}, open(os.path.join(folder, CHECKPOINT_FILE), "w"))
            tune.report({"epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(folder))


class InterruptInTheWindow(tune.Callback):
    def __init__(self, variant):
        self.variant = variant

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result["epoch"] == EPOCHS and self.variant not in interrupted:
            interrupted.add(self.variant)
            os.kill(os.getpid(), signal.SIGINT)


ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
out = {}
for variant in variants:
    callbacks = [InterruptInTheWindow(variant)] + ([RegisterReportedCheckpoints()] if variant == "fixed" else [])
    trainable = tune.with_resources(toy, {"cpu": 1})
    tune.Tuner(trainable, param_space={"variant": variant, "events": events},
               run_config=tune.RunConfig(name=variant, storage_path=storage, verbose=0, callbacks=callbacks,
                                         checkpoint_config=tune.CheckpointConfig(num_to_keep=1))).fit()
    (result,) = tune.Tuner.restore(f"{storage}/{variant}", trainable, resume_unfinished=True).fit()
    fs, path = result.filesystem, result.path
    with fs.open_input_stream(f"{path}/result.json") as f:
        epochs = [json.loads(line)["epoch"] for line in f.readall().decode().splitlines() if line.strip()]
    folders = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path))
                     if i.base_name.startswith("checkpoint_"))
    out[variant] = {"epochs": epochs, "final_epoch": result.metrics["epoch"],
                    "checkpoint": result.checkpoint.path.rsplit("/", 1)[-1], "folders": folders}
print("WINDOW " + json.dumps(out))
'''


def _run_window(storage: str, tmp_path: Path, variants: list[str], env: dict | None = None) -> dict:
    script = tmp_path / "window.py"
    script.write_text(_WINDOW)
    events = tmp_path / "events.jsonl"
    proc = subprocess.run([sys.executable, str(script), storage, str(events), *variants], cwd=REPO,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("WINDOW ")]
    out = json.loads(line.removeprefix("WINDOW "))
    for record in map(json.loads, events.read_text().splitlines()):
        out[record["variant"]].setdefault("resumed_from", []).append(record["resumed_from"])
    return out


def _assert_window_and_fix(out: dict) -> None:
    # the window is real: without the callback Tune hands back the previous epoch's checkpoint and the
    # restored trial trains and reports its final epoch a second time (if this fails, Ray now registers a
    # result's checkpoint with the result, and the callback has nothing left to do)
    control = out["control"]
    assert control["resumed_from"] == [2] and control["epochs"] == [1, 2, 3, 3], control
    # with it, the trial is restored from the final epoch's checkpoint and trains nothing: each epoch once,
    # the final result and its checkpoint kept (keep_checkpoints 1: that one folder)
    fixed = out["fixed"]
    assert fixed["resumed_from"] == [3], fixed
    assert fixed["epochs"] == [1, 2, 3] and fixed["final_epoch"] == 3, fixed
    assert fixed["checkpoint"] == "checkpoint_000002" and fixed["folders"] == ["checkpoint_000002"], fixed


@pytest.mark.e2e
def test_a_trial_interrupted_after_its_final_result_is_not_trained_again_on_resume(tmp_path):
    _assert_window_and_fix(_run_window(str(tmp_path / "runs"), tmp_path, ["control", "fixed"]))


@pytest.mark.e2e
@pytest.mark.storage
def test_a_trial_interrupted_after_its_final_result_is_not_trained_again_on_resume_in_s3(s3_server, tmp_path):
    _assert_window_and_fix(_run_window(s3_server.uri("window"), tmp_path, ["control", "fixed"], env=s3_server.env))
