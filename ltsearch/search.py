"""Distributed search with Ray Tune (Optuna + ASHA) over Ray Train trials. The only module importing Ray.

    result = run_search(load_search_space("search_spaces/quickstart.yaml"), storage="runs")

Experiment directory layout (`storage/name/`):
    space.yaml          the resolved search-space file this experiment runs
    optuna.db           the Optuna studies (SQLite; `optuna-dashboard sqlite:///optuna.db`)
    search/ | stage1/   Ray Tune's own experiment folder (trial results, checkpoints); a staged search's
                        second phase runs as Ray tasks and keeps its results in optuna.db (study stage2)
    train/              Ray Train runs of multi-worker trials
    results.csv         one row per trial; history.csv one row per trial and epoch
    best_config.yaml    the resolved experiment config of the best trial (selected on validation)
    summary.json        best trial, its val and test metrics, its checkpoint, paths

A trial with one worker runs the trainer inside the Tune trial process (no separate worker group: it
saves Ray Train's 20-30 s start-up per trial), and Tune reuses that process for the next trial; with
several workers it launches a `TorchTrainer` (DDP over gloo on CPU or NCCL on GPU) whose rank-0 reports
reach Tune through `TuneReportCallback`. Metrics are reduced across ranks inside the trainer before
reporting.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The legacy console output is the one that takes a CLIReporter (a compact table of chosen columns).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Save Tune's experiment state every 2 s (default: 10 s or more): what a hard kill of the driver can lose.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

import optuna
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from .config import ConfigError, ExperimentConfig, with_overrides
from .data import load_data
from .space import Distribution, SearchSettings, SearchSpaceFile, flat_config, suggest
from .train import TrainingDiverged, train

__all__ = ["EXPERIMENT_MARKER", "SearchResult", "connect", "results_table", "run_search"]

EXPERIMENT_MARKER = "space.yaml"
ACCURACY_PREFIXES = ("val_acc", "test_acc", "tau_val_acc", "tau_test_acc")
STAGE1_TRIAL = "stage1_trial"  # the stage-1 trial a staged search's stage-2 trial builds on


@dataclass
class SearchResult:
    path: Path
    results: pd.DataFrame
    best: dict[str, Any]


# ---------------------------------------------------------------------------- cluster


def connect(address: str | None = None, dashboard_host: str = "127.0.0.1", num_cpus: int | None = None,
            quiet: bool = False) -> dict:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray in this process with its
    dashboard on `dashboard_host` (loopback unless the caller passes another interface). Ray's own
    gRPC ports follow Ray's defaults; token authentication guards them (see docs/reliability.md).
    Returns the cluster's resources and dashboard URL."""
    url = None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "WARNING"}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            context = ray.init(address=address, **kwargs)
        else:
            context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=dashboard_host, **kwargs)
        url = context.dashboard_url
    return {"resources": ray.cluster_resources(), "dashboard_url": url}


def _trial_resources(settings: SearchSettings, cluster: dict[str, float]) -> tuple[dict, int]:
    """(resources of one worker, max concurrent trials) from the settings and the cluster."""
    r = settings.resources
    gpus = cluster.get("GPU", 0.0)
    gpus_per_worker = (1.0 if gpus else 0.0) if r.gpus_per_worker is None else r.gpus_per_worker
    if gpus_per_worker > 0 and gpus == 0:
        raise ConfigError(f"search.resources.gpus_per_worker: {gpus_per_worker} GPUs per worker requested, "
                          "but the Ray cluster has no GPU")
    need_cpu, need_gpu = r.num_workers * r.cpus_per_worker, r.num_workers * gpus_per_worker
    if need_cpu > cluster.get("CPU", 0.0):
        raise ConfigError(f"search.resources: a trial needs {need_cpu:g} CPUs, the cluster has "
                          f"{cluster.get('CPU', 0.0):g}")
    fits = math.floor(cluster.get("CPU", 0.0) / need_cpu)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu))
    concurrent = min(settings.max_concurrent or fits, max(fits, 1))
    return {"CPU": r.cpus_per_worker, "GPU": gpus_per_worker}, concurrent


# ---------------------------------------------------------------------------- trials


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}


def _train_and_report(config: ExperimentConfig, report, checkpoint, metrics: list[str]) -> None:
    """Run `train`, resuming from `checkpoint` (a Ray checkpoint or None). A diverged run ends with one
    last result carrying the reason in `diverged` and NaN objectives: the trial stops, the search goes on,
    and Optuna records the trial as failed instead of Tune retrying a deterministic failure."""
    try:
        if checkpoint is None:
            train(config, report=report)
        else:
            with checkpoint.as_directory() as resume_dir:
                train(config, report=report, resume_from=resume_dir)
    except TrainingDiverged as err:
        report({"epoch": err.epoch, "diverged": str(err), **{m: float("nan") for m in metrics}}, None)


def _train_worker(loop_config: dict) -> None:
    """Ray Train worker: one DDP rank of a trial."""
    import ray.train

    config = ExperimentConfig.model_validate(loop_config["config"])
    if config.trainer.device != "cpu":
        import torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(_scalars(metrics), checkpoint=checkpoint)

    _train_and_report(config, report, ray.train.get_checkpoint(), loop_config["metrics"])


def _trial(sampled: dict, base: dict, settings: dict, worker: dict, train_storage: str) -> None:
    """Tune function trainable: one configuration, reporting one result per epoch.

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
            tune.report(_scalars(metrics), checkpoint=checkpoint)

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


# ---------------------------------------------------------------------------- search


class _ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose SQLite study can be ahead of its own saved state after a hard kill of the driver.

    The study commits every ask and tell at once, while Tune saves the searcher only every few seconds.
    On restore, trials the study started that Tune never recorded are marked failed (Tune will not run
    them), and late reports for trials the study already finished are dropped instead of crashing.
    """

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            if trial.number not in known:
                self._ot_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def _sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    s = settings.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials,
                                      multivariate=True, group=True)


def _run_phase(exp: Path, phase: str, spec: SearchSpaceFile, space: dict[str, Distribution],
               base: ExperimentConfig, num_samples: int, cluster: dict, resume: bool) -> tune.ResultGrid:
    """One Tune experiment `exp/phase` of `_trial`s searching `space` on top of `base`."""
    settings = spec.search
    worker, concurrent = _trial_resources(settings, cluster)
    trainable = tune.with_parameters(_trial, base=base.model_dump(), settings=settings.model_dump(),
                                     worker=worker, train_storage=str(exp / "train"))
    # Several workers: Train's worker group holds the resources and the trial driver a token.
    request = worker if settings.resources.num_workers == 1 else {"CPU": 0, "memory": 2**20}
    trainable = tune.with_resources(trainable, {k.lower(): v for k, v in request.items() if v or k == "CPU"})
    phase_path = exp / phase
    if resume and tune.Tuner.can_restore(str(phase_path)):
        return tune.Tuner.restore(str(phase_path), trainable, resume_unfinished=True, resume_errored=True).fit()

    flat_base = flat_config(base)
    searcher = _ResumableOptunaSearch(
        space=functools.partial(suggest, space=space, base=flat_base),  # picklable: Tune saves it
        metric=settings.metrics if len(settings.metrics) > 1 else settings.metrics[0],
        mode=settings.directions if len(settings.metrics) > 1 else settings.directions[0],
        sampler=_sampler(settings), study_name=phase,
        storage=optuna.storages.RDBStorage(f"sqlite:///{exp / 'optuna.db'}"))
    total_epochs = base.stage1.epochs + (base.stage2.epochs if base.stage2.enabled else 0)
    scheduler = (ASHAScheduler(time_attr="epoch", metric=settings.metrics[0], mode=settings.directions[0],
                               max_t=total_epochs, grace_period=settings.scheduler.grace_period,
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
        run_config=tune.RunConfig(
            name=phase, storage_path=str(exp), verbose=1, progress_reporter=_reporter(settings, list(space)),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
    )
    return tuner.fit()


def _reporter(settings: SearchSettings, keys: list[str]) -> tune.CLIReporter:
    """A compact status table every 30 s: sampled values, epoch and the searched metrics."""
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", **{m: m for m in settings.metrics}, "test_acc": "test_acc"},
        parameter_columns={k: k.replace("stage1.", "s1.").replace("stage2.", "s2.") for k in keys},
        max_report_frequency=30, print_intermediate_tables=True, sort_by_metric=False, max_progress_rows=30)


def results_table(grid: tune.ResultGrid, spec: SearchSpaceFile, keys: list[str],
                  max_epoch: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, one row per trial and epoch) from a finished Tune experiment."""
    rows, history = [], []
    for result in grid:
        trial_id = Path(result.path).name if result.path else None
        trial_id = result.metrics.get("trial_id", trial_id) if result.metrics else trial_id
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame.sort_values("epoch").drop_duplicates("epoch", keep="last")
            history.append(frame)
        error = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else None
        row = _trial_row(trial_id, {key: result.config.get(key) for key in keys}, frame, error, spec.search,
                         max_epoch)
        if frame is not None and len(frame):
            row["checkpoint"] = (result.checkpoint.path if result.checkpoint
                                 else frame.iloc[-1].get("checkpoint_path"))
        rows.append(row)
    return pd.DataFrame(rows), (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def _trial_row(trial_id: str, values: dict, frame: pd.DataFrame | None, error: str | None,
               settings: SearchSettings, max_epoch: int) -> dict[str, Any]:
    """One results.csv row: sampled values, final and best-by-validation metrics, status and why it stopped.
    `frame` holds the trial's results, one row per epoch in order."""
    row: dict[str, Any] = {"trial_id": trial_id, **values}
    epochs = 0
    if frame is not None and len(frame):
        last = frame.iloc[-1]
        epochs = int(last["epoch"])
        reported = [c for c in frame.columns if c.startswith(ACCURACY_PREFIXES) or c in settings.metrics]
        row.update({f"final_{c}": last[c] for c in reported})
        if "val_acc" in frame and frame["val_acc"].notna().any():
            best = frame.loc[frame["val_acc"].idxmax()]
            row["best_epoch"] = int(best["epoch"])
            row.update({f"best_{c}": best[c] for c in reported})
    row["epochs"] = epochs
    row["objective"] = row.get(f"final_{settings.metrics[0]}")
    diverged = frame["diverged"].dropna() if frame is not None and "diverged" in frame else []
    if error is not None:
        row["status"], row["stop_reason"] = "ERROR", error
    elif len(diverged):
        row["status"], row["stop_reason"] = "TERMINATED", f"diverged: {diverged.iloc[-1]}"
    elif epochs >= max_epoch:
        row["status"], row["stop_reason"] = "TERMINATED", "completed"
    else:
        row["status"], row["stop_reason"] = "TERMINATED", f"stopped early by ASHA at epoch {epochs}"
    return row


# ---------------------------------------------------------------------------- staged mode


def _fit_stage2(cache: dict, config: dict) -> tuple[list[dict], dict]:
    """Ray task: one stage-2 trial (or tau evaluation) on cached features. Returns its scalar results, one
    per epoch, and the per-class accuracies of its last epoch."""
    from .features import fit_classifier

    started, history = time.time(), []

    def report(metrics: dict) -> None:
        now = time.time()
        history.append({**_scalars(metrics), "timestamp": now, "time_total_s": now - started})

    last = fit_classifier(cache, ExperimentConfig.model_validate(config), report=report)
    return history, {k: v for k, v in last.items() if k.endswith("per_class_acc")}


def _search_stage2(exp: Path, spec: SearchSpaceFile, space: dict[str, Distribution], configs: dict,
                   caches: dict, cluster: dict, resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Staged mode's second phase: an Optuna ask/tell loop on the driver, each trial a Ray task.

    A stage-2 trial is about a second of work on cached features. As a Tune trial it would also cost a
    trial actor's start-up and Tune's bookkeeping, ~10 s (docs/benchmarks.md, benchmark 3); Ray tasks run
    in pooled worker processes, so the phase runs as tasks, as many at once as the cluster has worker
    slots. Each finished trial's results (`history`, and `per_class` accuracies of its last epoch) are
    stored as user attributes of its Optuna trial (study `stage2` in optuna.db): a resumed search keeps
    them; trials an interruption left running are failed and redrawn.
    """
    settings = spec.search
    storage = optuna.storages.RDBStorage(f"sqlite:///{exp / 'optuna.db'}")
    study = optuna.create_study(
        study_name="stage2", storage=storage, sampler=_sampler(settings), load_if_exists=resume,
        directions=["maximize" if d == "max" else "minimize" for d in settings.directions])
    finished = [t for t in study.get_trials(deepcopy=False) if "history" in t.user_attrs or "error" in t.user_attrs]
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    worker, concurrent = _trial_resources(settings, cluster)
    fit = ray.remote(_fit_stage2).options(num_cpus=worker["CPU"])
    flat_base, num_samples = flat_config(spec.base), settings.staged.num_samples
    pending: dict[ray.ObjectRef, optuna.Trial] = {}
    launched, last_print = len(finished), 0.0
    while launched < num_samples or pending:
        while launched < num_samples and len(pending) < concurrent:
            trial = study.ask()
            suggest(trial, space, flat_base)
            sampled = dict(trial.params)
            parent = sampled.pop(STAGE1_TRIAL)
            config = with_overrides(ExperimentConfig.model_validate(configs[parent]),
                                    {"stage2.enabled": spec.base.stage2.enabled, **sampled})
            pending[fit.remote(caches[parent], config.model_dump())] = trial
            launched += 1
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        trial = pending.pop(ref)
        try:
            history, per_class = ray.get(ref)
        except ray.exceptions.RayError as err:
            trial.set_user_attr("error", str(err).strip().splitlines()[-1][:300])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            trial.set_user_attr("history", history)
            trial.set_user_attr("per_class", per_class)
            study.tell(trial, [history[-1].get(m, math.nan) for m in settings.metrics])
        finished.append(trial)
        if time.time() - last_print > 5 or launched == num_samples and not pending:
            last_print = time.time()
            print(f"stage 2: {len(finished)}/{num_samples} trials finished, {len(pending)} running", flush=True)
    return _stage2_tables(study, spec, list(space))


def _stage2_tables(study: optuna.Study, spec: SearchSpaceFile, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results.csv and history.csv rows of the stage-2 phase, from its Optuna study."""
    max_epoch = spec.base.stage2.epochs if spec.base.stage2.enabled else 1
    rows, history = [], []
    for trial in study.get_trials(deepcopy=False):
        if "history" not in trial.user_attrs and "error" not in trial.user_attrs:
            continue  # interrupted, redrawn
        trial_id = f"stage2_{trial.number:05d}"
        frame = pd.DataFrame(trial.user_attrs.get("history", []))
        if len(frame):
            frame.insert(0, "trial_id", trial_id)
            history.append(frame)
        rows.append(_trial_row(trial_id, {k: trial.params.get(k) for k in keys}, frame,
                               trial.user_attrs.get("error"), spec.search, max_epoch))
    return pd.DataFrame(rows), (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def _run_staged(exp: Path, spec: SearchSpaceFile, cluster: dict, resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Search stage 1; cache features of its top-k checkpoints (by validation accuracy); search stage 2
    (and tau) on them. The table has a `phase` column; stage-2 rows carry their stage-1 parent's values."""
    from .features import cache_features

    settings, staged = spec.search, spec.search.staged
    stage1_keys, stage2_keys = spec.sample_keys("stage1"), spec.sample_keys("stage2")
    base1 = with_overrides(spec.base, {"stage2.enabled": False})
    grid1 = _run_phase(exp, "stage1", spec, {k: spec.space[k] for k in stage1_keys}, base1,
                       settings.num_samples if stage1_keys else 1, cluster, resume)
    table1, history1 = results_table(grid1, spec, stage1_keys, base1.stage1.epochs)
    table1.insert(0, "phase", "stage1")
    history1.insert(0, "phase", "stage1")
    ranked = table1[table1["status"] != "ERROR"].sort_values("best_val_acc", ascending=False).head(staged.top_k)
    configs, caches = {}, {}
    remote_cache = ray.remote(cache_features).options(num_cpus=settings.resources.cpus_per_worker)
    for _, row in ranked.iterrows():
        config = with_overrides(base1, {k: _plain(row[k]) for k in stage1_keys if not _missing(row[k])})
        configs[row["trial_id"]] = config.model_dump()
        caches[row["trial_id"]] = remote_cache.remote(config, row["checkpoint"], staged.views)
    print(f"Stage 2 on cached features of stage-1 trials {list(caches)} ({staged.views} views each)", flush=True)
    space2 = {STAGE1_TRIAL: Distribution(choice=list(caches)), **{k: spec.space[k] for k in stage2_keys}}
    table2, history2 = _search_stage2(exp, spec, space2, configs, caches, cluster, resume)
    parents = table1.set_index("trial_id")
    for key in stage1_keys:
        table2[key] = [parents.at[p, key] for p in table2[STAGE1_TRIAL]]
    table2.insert(0, "phase", "stage2")
    history2.insert(0, "phase", "stage2")
    return pd.concat([table1, table2], ignore_index=True), pd.concat([history1, history2], ignore_index=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _best_row(table: pd.DataFrame, settings: SearchSettings) -> pd.Series | None:
    """The trial with the best final objective (staged mode: among stage-2 trials)."""
    if "phase" in table:
        table = table[table["phase"] == "stage2"]
    ok = table[table["status"] != "ERROR"].dropna(subset=["objective"]) if len(table) else table
    if not len(ok):
        return None
    ascending = settings.directions[0] == "min"
    return ok.sort_values(["objective", "epochs"], ascending=[ascending, False]).iloc[0]


def run_search(spec: SearchSpaceFile, *, storage: str | Path = "runs", name: str | None = None,
               address: str | None = None, dashboard_host: str = "127.0.0.1", resume: bool = False,
               source: str = "space") -> SearchResult:
    """Run (or resume) the search described by `spec`; return its results table and best trial."""
    storage = Path(storage).expanduser().resolve()
    load_data(spec.base)  # a missing or corrupt dataset is refused (or downloaded once) before Ray starts
    if resume:
        if name is None:
            raise ConfigError("--resume needs --name (the experiment to continue)")
        exp = storage / name
        if not (exp / EXPERIMENT_MARKER).exists():
            raise ConfigError(f"--resume: {exp} holds no ltsearch experiment (no {EXPERIMENT_MARKER})")
    else:
        name = name or f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp = storage / name
        if exp.exists():
            raise ConfigError(f"--name: {exp} already exists; pass --resume to continue it or another --name")
        try:
            exp.mkdir(parents=True)
        except OSError as err:
            raise ConfigError(f"--storage: cannot create {exp}: {err.strerror}") from None
        _atomic_write_text(exp / EXPERIMENT_MARKER, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    info = connect(address, dashboard_host)
    if info["dashboard_url"]:
        print(f"Ray dashboard: http://{info['dashboard_url']} (token auth: see README 'Dashboard')", flush=True)
    print(f"Experiment: {exp}", flush=True)
    cluster = info["resources"]
    settings = spec.search
    started = time.time()
    if settings.mode == "joint":
        grid = _run_phase(exp, "search", spec, spec.space, spec.base, settings.num_samples, cluster, resume)
        max_epoch = spec.base.stage1.epochs + (spec.base.stage2.epochs if spec.base.stage2.enabled else 0)
        table, history = results_table(grid, spec, list(spec.space), max_epoch)
    else:
        table, history = _run_staged(exp, spec, cluster, resume)
    best = _write_results(exp, spec, table, history, time.time() - started)
    return SearchResult(path=exp, results=table, best=best)


def _write_results(exp: Path, spec: SearchSpaceFile, table: pd.DataFrame, history: pd.DataFrame,
                   wall_time_s: float) -> dict:
    _atomic_write_text(exp / "results.csv", table.to_csv(index=False))
    _atomic_write_text(exp / "history.csv", history.to_csv(index=False))
    best_row = _best_row(table, spec.search)
    summary: dict[str, Any] = {"experiment": str(exp), "num_trials": len(table),
                               "wall_time_s": wall_time_s, "metric": spec.search.metrics}
    if best_row is not None:
        sampled = {k: _plain(best_row[k]) for k in spec.space if k in best_row and not _missing(best_row[k])}
        best_config = with_overrides(spec.base, sampled)
        _atomic_write_text(exp / "best_config.yaml", yaml.safe_dump(best_config.model_dump(), sort_keys=False))
        summary["best"] = {k: _plain(v) for k, v in best_row.items() if not _missing(v)}
    if spec.search.metrics and len(spec.search.metrics) > 1:
        _write_pareto(exp, spec)
    _atomic_write_text(exp / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary.get("best", {})


def _write_pareto(exp: Path, spec: SearchSpaceFile) -> None:
    """The Optuna study's Pareto front (multi-objective searches) as `pareto.csv`."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{exp / 'optuna.db'}")
    frames = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if len(study.directions) < 2:
            continue
        for t in study.best_trials:
            frames.append({"study": summary.study_name, "optuna_trial": t.number, **t.params,
                           **{m: v for m, v in zip(spec.search.metrics, t.values)}})
    _atomic_write_text(exp / "pareto.csv", pd.DataFrame(frames).to_csv(index=False))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    """numpy scalars -> python, for YAML and JSON."""
    return value.item() if hasattr(value, "item") else value
