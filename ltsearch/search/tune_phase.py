"""A Tune experiment of `trials`: Optuna (TPE, NSGA-II or random) suggests, ASHA stops early, and the
Optuna study (`optuna.db`, or a database server: `studies.py`) records each trial as it ended: COMPLETE,
PRUNED (stopped by ASHA, with its per-epoch intermediate values) or FAIL (diverged or errored). The
experiment may live in a local folder or in object storage (`ltsearch.storage.Location`): Tune stores
through pyarrow either way."""
from __future__ import annotations

import fcntl
import fnmatch
import functools
import json
import math
import os
import pickletools
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from ..config import ConfigError, ExperimentConfig, with_overrides
from ..space import Distribution, SearchSettings, SearchSpaceFile, flat_config, suggest
from ..storage import Location
from .lazy_test import asha_rungs, lazy_test_config
from .loggers import logger_callbacks
from .resources import trial_resources
from .results import planned_epochs, trial_row
from .studies import Studies
from .trials import RegisterReportedCheckpoints, drop_unregistered_checkpoints, grid_trial, trial

__all__ = ["make_sampler", "results_table", "run_grid", "run_phase"]

_Finished = optuna.exceptions.UpdateFinishedTrialError
# The studies of the phase this driver runs. Tune pickles the searcher with the storage it was made with;
# a driver that resumes (perhaps on another machine, with the SQLite copy at another path) re-points it
# here, and the searcher's saves copy a mirrored SQLite study to the experiment.
_active: dict[str, Studies] = {}


class _LtOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, with three corrections.

    - A trial ASHA stopped is told PRUNED (Ray tells it COMPLETE with its partial value, which misleads
      TPE and the parameter importances); a diverged trial is told FAIL. Both are read from the trial's
      last result: `epoch` below `total_epochs`, or a `diverged` reason.
    - Intermediate values are reported at the global `epoch`, not at Tune's `training_iteration`, which a
      trial restarted from its checkpoint counts again from 1.
    - The study can be ahead of Tune's saved searcher state after a hard kill of the driver (the study
      commits every ask and tell at once, Tune saves the searcher every few seconds). On restore, trials
      the study started that Tune never recorded are failed (Tune will not run them), and late reports
      for trials the study already finished are dropped instead of crashing. A SQLite study mirrored to
      object storage is copied there at every save of the searcher, so it is never behind it either.
    """

    def save(self, checkpoint_path: str) -> None:
        super().save(checkpoint_path)
        if "studies" in _active:
            _active["studies"].save()

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if "studies" in _active:  # the storage of this driver, not the pickled one of the first
            studies = _active["studies"]
            self._storage = studies.storage()
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)
            self._ot_trials = {tid: optuna.Trial(self._ot_study, t._trial_id) for tid, t in self._ot_trials.items()}
        known = {t.number for t in self._ot_trials.values()}
        for ot_trial in self._ot_study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            if ot_trial.number not in known:
                self._ot_study.tell(ot_trial.number, state=optuna.trial.TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # Optuna keeps no intermediate values for several objectives
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        try:
            self._ot_trials[trial_id].report(value, int(result["epoch"]))
        except _Finished:
            pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        state = None
        if result and not error and trial_id not in self._completed_trials and trial_id in self._ot_trials:
            if result.get("diverged"):
                state = optuna.trial.TrialState.FAIL
            elif result.get("epoch", 0) < result.get("total_epochs", 0):
                state = optuna.trial.TrialState.PRUNED
                self.on_trial_result(trial_id, result)  # the result ASHA stopped it on: Tune passes it only here
        try:
            if state is None:
                super().on_trial_complete(trial_id, result, error)
                return
            self._ot_study.tell(self._ot_trials[trial_id], state=state)
        except _Finished:
            pass
        self._completed_trials.add(trial_id)


def make_sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    s = settings.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials,
                                      multivariate=True, group=True)


def _trainable(exp: Location, spec: SearchSpaceFile, base: ExperimentConfig, cluster: dict, function=trial,
               **parameters):
    """`function` as a Tune trainable with `base`, the settings, one worker's resources and `parameters`
    bound, requesting what one trial holds; and how many trials run at once."""
    settings = spec.search
    worker, concurrent = trial_resources(settings, cluster)
    trainable = tune.with_parameters(function, base=base.model_dump(), settings=settings.model_dump(),
                                     worker=worker, train_storage=str(exp / "train"), **parameters)
    # Several workers: Train's worker group holds the resources and the trial driver a token.
    request = worker if settings.resources.num_workers == 1 else {"CPU": 0, "memory": 2**20}
    request = {k.lower(): v for k, v in request.items() if v or k == "CPU"}
    return tune.with_resources(trainable, request), concurrent


# Tune stages a run's state on the driver's node in `<Ray session>/artifacts/<start second>/<run name>/` and
# copies that whole folder into the experiment, so two drivers on one cluster starting a phase of the same
# name (`search`) in the same second would write into each other's experiments. Drivers on one machine
# therefore take turns to start a phase: each holds this lock until Tune has taken its start second. (A
# restored run keeps the start second it was first staged under, so restores need no turn.)
_START_LOCK = Path(tempfile.gettempdir()) / f"ltsearch-tune-start-{os.getuid()}.lock"
_held: list = []  # the open lock file while this driver holds it


def _fit(tuner: tune.Tuner, exp: Location) -> tune.ResultGrid:
    """`tuner.fit()` of a new run, started in a second no other ltsearch driver on this machine started in."""
    lock = open(_START_LOCK, "a")  # noqa: SIM115 (closed by _release_start: from Tune's callback, or below)
    fcntl.flock(lock, fcntl.LOCK_EX)
    _held.append(lock)
    try:
        grid = tuner.fit()
    finally:
        _release_start()
    drop_unregistered_checkpoints(exp / "train")
    return grid


def _restore(exp: Location, phase: str, trainable) -> tune.ResultGrid:
    """Continue the Tune run `exp/phase` (its finished trials kept, the others from their checkpoints)."""
    _check_saved_state(exp / phase)
    grid = tune.Tuner.restore(str(exp / phase), trainable, resume_unfinished=True, resume_errored=True).fit()
    drop_unregistered_checkpoints(exp / "train")
    return grid


def _release_start() -> None:
    while _held:
        lock = _held.pop()
        time.sleep(1 - time.time() % 1)  # the next driver starts its phase in a later second
        lock.close()


class _ReleaseStart(tune.Callback):
    """Releases `_START_LOCK` when Tune sets its callbacks up: after it made its storage context (which
    fixes the staging folder's start second) and named its state files (also by the second)."""

    def setup(self, **info) -> None:
        _release_start()


def _check_saved_state(phase_path: Location) -> None:
    """Refuse to resume from a cut-off Tune state (Tune copies its state files into the experiment without a
    temporary file, so a disk that fills up during the copy cuts them): Tune would log the error and start
    the phase over, and the tables would then list only the new trials."""
    phase_path = Location(phase_path)
    names = phase_path.children()
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
        newest = max(fnmatch.filter(names, pattern), default=None)  # the one Tune restores from
        if newest is None:
            continue
        newest = phase_path / newest
        data = newest.read_bytes()
        try:  # the experiment state is JSON; the other two are pickles (whatever their name says)
            json.loads(data) if pattern.startswith("experiment_") else list(pickletools.genops(data))
        except ValueError as err:
            raise ConfigError(f"--resume: {newest}: Tune's saved state is cut off ({err}), as a full disk leaves "
                              f"it; this phase cannot be continued (its trials stay in {phase_path}): start a "
                              "new --name") from None


def _run_config(settings: SearchSettings, phase: str, exp: Location, reporter: tune.CLIReporter) -> tune.RunConfig:
    return tune.RunConfig(
        name=phase, storage_path=str(exp), verbose=1, progress_reporter=reporter,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        callbacks=[_ReleaseStart(), RegisterReportedCheckpoints(), *logger_callbacks(settings, exp, phase)])


def run_phase(exp: Location, phase: str, spec: SearchSpaceFile, space: dict[str, Distribution],
              base: ExperimentConfig, num_samples: int, max_epochs: int, cluster: dict,
              resume: bool) -> tune.ResultGrid:
    """One Tune experiment `exp/phase` of trials searching `space` on top of `base`; ASHA's horizon is
    `max_epochs`, the most epochs any sampled configuration can plan."""
    settings = spec.search
    base = lazy_test_config(base, asha_rungs(settings.scheduler, max_epochs))  # test where ASHA can stop a trial
    trainable, concurrent = _trainable(exp, spec, base, cluster)
    studies = _active["studies"] = Studies(exp, settings.optuna_storage)
    if resume and tune.Tuner.can_restore(str(exp / phase)):
        return _restore(exp, phase, trainable)

    multi = len(settings.metrics) > 1
    searcher = _LtOptunaSearch(
        space=functools.partial(suggest, space=space, base=flat_config(base)),  # picklable: Tune saves it
        metric=settings.metrics if multi else settings.metrics[0],
        mode=settings.directions if multi else settings.directions[0],
        sampler=make_sampler(settings), study_name=studies.name(phase), storage=studies.storage())
    scheduler = (ASHAScheduler(time_attr="epoch", metric=settings.metrics[0], mode=settings.directions[0],
                               max_t=max_epochs, grace_period=settings.scheduler.grace_period,
                               reduction_factor=settings.scheduler.reduction_factor)
                 if settings.scheduler.enabled else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        # reuse_actors: a finished one-worker trial's process runs the next trial, which then skips a process
        # start and the imports of torch, Ray Tune, Optuna and pandas (~4 s a trial, docs/benchmarks.md,
        # benchmark 2). Not for multi-worker trials: Tune's reset waits only 2 s for the trial's thread,
        # and a TorchTrainer still shutting its worker group down makes the next trial fail instead.
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrent,
                                    reuse_actors=settings.resources.num_workers == 1),
        run_config=_run_config(settings, phase, exp, _reporter(settings, list(space))),
    )
    return _fit(tuner, exp)


def run_grid(exp: Location, phase: str, spec: SearchSpaceFile, base: ExperimentConfig, runs: dict[str, dict],
             cluster: dict, resume: bool) -> tune.ResultGrid:
    """One Tune experiment `exp/phase` with one trial per entry of `runs` (run name -> dotted values on top
    of `base`): a grid, no searcher, no early stopping (every run goes to its end). `resume` continues an
    interrupted one (finished runs are kept, unfinished ones continue from their last checkpoint)."""
    settings = spec.search
    base = lazy_test_config(base, [])  # nothing stops a run early: test at stage ends only
    trainable, concurrent = _trainable(exp, spec, base, cluster, function=grid_trial, runs=runs)
    if resume and tune.Tuner.can_restore(str(exp / phase)):
        return _restore(exp, phase, trainable)
    tuner = tune.Tuner(
        trainable, param_space={"run": tune.grid_search(list(runs))},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent,
                                    reuse_actors=settings.resources.num_workers == 1),
        run_config=_run_config(settings, phase, exp, _reporter(settings, ["run"])),
    )
    return _fit(tuner, exp)


def _reporter(settings: SearchSettings, keys: list[str]) -> tune.CLIReporter:
    """A compact status table every 30 s: sampled values, epoch and the searched metrics."""
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", **{m: m for m in settings.metrics}, "test_acc": "test_acc"},
        parameter_columns={k: k.replace("stage1.", "s1.").replace("stage2.", "s2.") for k in keys},
        max_report_frequency=30, print_intermediate_tables=True, sort_by_metric=False, max_progress_rows=30)


def results_table(grid: tune.ResultGrid, settings: SearchSettings, keys: list[str], base: ExperimentConfig,
                  runs: dict[str, dict] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, one row per trial and epoch) from a finished Tune experiment. A `run_grid`
    experiment passes its `runs`: each row then has its run name in `run` and that run's values."""
    rows, history = [], []
    pruner = "ASHA" if settings.scheduler.enabled and runs is None else None
    for result in grid:
        trial_id = Path(result.path).name if result.path else None
        trial_id = result.metrics.get("trial_id", trial_id) if result.metrics else trial_id
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame.sort_values("epoch").drop_duplicates("epoch", keep="last")
            history.append(frame)
        sampled = runs[result.config["run"]] if runs is not None else result.config
        values = {key: sampled.get(key) for key in keys}
        planned = planned_epochs(with_overrides(base, {k: v for k, v in values.items() if v is not None}))
        error = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else None
        row = trial_row(trial_id, values, frame, error, settings, planned, pruner)
        if runs is not None:
            row["run"] = result.config["run"]
        if frame is not None and len(frame):
            # a multi-worker trial's checkpoint is Ray Train's: its path comes in the reported metrics
            row["checkpoint"] = (_checkpoint_location(result.checkpoint.path, result.checkpoint.filesystem)
                                 if result.checkpoint else
                                 _checkpoint_location(frame.iloc[-1].get("checkpoint_path"), result.filesystem))
        rows.append(row)
    return pd.DataFrame(rows), (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def _checkpoint_location(path: str | None, filesystem) -> str | None:
    """A checkpoint's folder as a local path or, in object storage, as a URI (`s3://bucket/...`)."""
    import pyarrow.fs

    if not isinstance(path, str) or filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path if isinstance(path, str) else None
    return str(Location("", _fs=filesystem, _path=path))
