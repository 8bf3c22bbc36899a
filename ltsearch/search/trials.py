"""Tune trials: one configuration trained by `ltsearch.train`, reporting one result per epoch.

A trial with one worker runs the trainer inside the Tune trial process (no separate worker group: it saves
Ray Train's 20-30 s start-up per trial), and Tune reuses that process for the next trial; with several
workers it launches a `TorchTrainer` (DDP over gloo on CPU or NCCL on GPU) whose rank-0 reports reach Tune
through `TuneReportCallback`. Metrics are reduced across ranks inside the trainer before reporting. Every
result carries `total_epochs`, the epochs the trial's configuration plans, so the searcher and the result
table can tell a trial stopped early from one that completed.
"""
from __future__ import annotations

import logging
import os
import posixpath

from ray import tune

from ..config import ExperimentConfig, with_overrides
from ..files import CHECKPOINT_FILE
from ..space import SearchSettings
from ..storage import Location
from ..train import TrainingDiverged, train
from .results import planned_epochs

__all__ = ["RegisterReportedCheckpoints", "drop_unregistered_checkpoints", "grid_trial",
           "register_reported_checkpoint", "trial"]


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}


def _train_and_report(config: ExperimentConfig, report, checkpoint, metrics: list[str]) -> None:
    """Run `train`, resuming from `checkpoint` (a Ray checkpoint or None). A diverged run ends with one
    last result carrying the reason in `diverged` and NaN objectives: the trial stops, the search goes on,
    and Optuna records the trial as failed instead of Tune retrying a deterministic failure."""
    total = planned_epochs(config)

    def report_epoch(result: dict, checkpoint_dir: str | None) -> None:
        report({**_scalars(result), "total_epochs": total}, checkpoint_dir)

    try:
        if checkpoint is None:
            train(config, report=report_epoch)
        else:
            with checkpoint.as_directory() as resume_dir:
                train(config, report=report_epoch, resume_from=resume_dir)
    except TrainingDiverged as err:
        report_epoch({"epoch": err.epoch, "diverged": str(err), **{m: float("nan") for m in metrics}}, None)


def _train_worker(loop_config: dict) -> None:
    """Ray Train worker: one DDP rank of a trial. Its results carry `worker_pid` (Tune's own `pid` is the
    trial process's, which outlives a worker group that Ray Train restarted after a failure)."""
    import ray.train

    config = ExperimentConfig.model_validate(loop_config["config"])
    if config.trainer.device != "cpu":
        import torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "worker_pid": os.getpid()}, checkpoint=checkpoint)

    _train_and_report(config, report, ray.train.get_checkpoint(), loop_config["metrics"])


def trial(sampled: dict, base: dict, settings: dict, worker: dict, train_storage: str) -> None:
    """Tune function trainable: the configuration `base` + `sampled`, one result per epoch.

    `worker` holds the resolved resources of one worker ({"CPU": n, "GPU": g})."""
    for noisy in ("ray.train", "ray.tune"):  # one "Checkpoint successfully created" line per epoch otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = SearchSettings.model_validate(settings)
    config = with_overrides(ExperimentConfig.model_validate(base), sampled)
    r, use_gpu = settings.resources, worker["GPU"] > 0
    if config.trainer.num_threads is None:
        config = with_overrides(config, {"trainer.num_threads": max(1, int(worker["CPU"]))})
    if not use_gpu and config.trainer.device == "auto":
        config = with_overrides(config, {"trainer.device": "cpu"})
    if r.num_workers == 1:
        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            tune.report(metrics, checkpoint=checkpoint)

        _train_and_report(config, report, tune.get_checkpoint(), settings.metrics)
        return

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(), "metrics": settings.metrics},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={k: v for k, v in worker.items() if v}),
        run_config=RunConfig(name=tune.get_context().get_trial_id(), storage_path=train_storage,
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    trainer.fit()


def drop_unregistered_checkpoints(train_storage: Location) -> None:
    """Delete, in each Ray Train run under `train_storage` (one per multi-worker trial), the checkpoint folders
    its checkpoint manager does not hold. When a worker group fails, rank 0 may have uploaded checkpoints of
    epochs whose reports the controller never took (the run restarts from the last registered one and trains
    those epochs again); Ray Train 2.60 leaves those folders, so `keep_checkpoints` would not bound the
    folders kept. Called by the driver after a phase: a trial's own process may be stopped (by ASHA at its
    last epoch, say) before its Ray Train run returns."""
    from ray.train import Result

    train_storage = Location(train_storage)
    noisy = logging.getLogger("ray.train")
    level = noisy.level
    noisy.setLevel(logging.WARNING)  # Result.from_path announces the snapshot it loads
    try:
        for name in train_storage.children():
            run = train_storage / name
            try:
                result = Result.from_path(str(run))
            except (RuntimeError, FileNotFoundError, NotADirectoryError):  # no checkpoint reported; a file
                continue
            kept = {checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for checkpoint, _ in result.best_checkpoints or []}
            for folder in run.children():
                if folder.startswith("checkpoint_") and folder not in kept:
                    (run / folder).delete()
    finally:
        noisy.setLevel(level)


def _checkpoint_index(path: str) -> int:
    """7 for `.../checkpoint_000007`; -1 for a folder of another name."""
    try:
        return int(posixpath.basename(path.rstrip("/")).rsplit("_", 1)[-1])
    except ValueError:
        return -1


def register_reported_checkpoint(trial) -> bool:
    """Make a trial's last recorded result and its checkpoint one record again; True if it registered one.

    Tune takes a reported epoch in two steps: the result (written to `result.json`, kept as the trial's
    `last_result`, which names its checkpoint in `checkpoint_dir_name`), then a separate save that registers
    the checkpoint the trial process had already written to storage. A stop between the two (Ctrl-C, a
    failure) leaves Tune's saved state with the epoch's result but the previous checkpoint, and the trial
    would train that epoch, final or not, again from there. Registering the named checkpoint (when it is
    newer than the registered one and its checkpoint file is in the trial's folder) is what Tune's save
    would have done: the trial then continues after its last recorded epoch, one that reported its final
    epoch ends without training, and the checkpoint kept for it is that of its last result."""
    import pyarrow.fs
    from ray.train._internal.session import _TrainingResult  # what Tune's own save hands to the trial

    fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path

    def complete(name: str) -> bool:
        path = posixpath.join(folder, name, CHECKPOINT_FILE)
        return fs.get_file_info(path).type == pyarrow.fs.FileType.File

    last = trial.last_result or {}
    name, current = last.get("checkpoint_dir_name"), trial.checkpoint
    if current is not None and not complete(posixpath.basename(current.path.rstrip("/"))):
        # After a hard kill of the driver, Tune's saved state can name a checkpoint that `keep_checkpoints`
        # already deleted (the deletion is immediate, the state's upload lags): continue from the newest
        # complete one instead of failing the trial.
        selector = pyarrow.fs.FileSelector(folder, allow_not_found=True)
        kept = [i.base_name for i in fs.get_file_info(selector) if i.base_name.startswith("checkpoint_")]
        name = max((n for n in kept if complete(n)), key=_checkpoint_index, default=None)
        if name is None:
            return False
    elif (not name or current is not None and _checkpoint_index(current.path) >= _checkpoint_index(name)
          or not complete(name)):
        return False
    path = posixpath.join(folder, name)
    trial.on_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(path, filesystem=fs), metrics=dict(last)))
    return True


class RegisterReportedCheckpoints(tune.Callback):
    """Before a pending trial starts (restored by `--resume`, or retried after a failure), registers the
    checkpoint of its last recorded result where Tune was stopped before it could
    (`register_reported_checkpoint`)."""

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        for t in trials:
            if t.status == t.PENDING and register_reported_checkpoint(t):
                logging.getLogger(__name__).info("trial %s continues from %s, the checkpoint of its last "
                                                 "recorded result", t.trial_id, t.checkpoint.path)


def grid_trial(config: dict, runs: dict, **parameters) -> None:
    """Tune function trainable of a `run_grid` phase: `config["run"]` names one entry of `runs` (dotted
    values, such as a confirmed configuration with its fresh `trainer.seed`), trained as `trial` trains."""
    trial(runs[config["run"]], **parameters)
