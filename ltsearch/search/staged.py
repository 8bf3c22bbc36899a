"""Staged mode: search stage 1 with Tune; cache backbone features of its top-k checkpoints; search the
stage-2 and post-hoc keys on those features as an Optuna ask/tell loop whose trials are Ray tasks.

A stage-2 trial is about a second of work on cached features. As a Tune trial it would also cost a trial
actor's start-up and Tune's bookkeeping, ~10 s (docs/benchmarks.md, benchmark 3); Ray tasks run in pooled
worker processes, so the phase runs as tasks, as many at once as the cluster has CPUs for. Each finished
trial's results (`history`, `per_class` accuracies of its last epoch, and `val_correct`, that epoch's
per-image validation correctness for the paired tie test: 6.7 kB for ImageNet-LT's 20,000 images) are
stored as user attributes of its Optuna trial (study `stage2`, see `studies.py`) before it is told: a
resumed search keeps them; trials an interruption left running are failed and redrawn, or completed if
their results were already stored.
There is no early stopping in this phase. Stage-1 checkpoints in object storage are downloaded by the
task that caches their features.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import ray

from ..config import ConfigError, ExperimentConfig, with_overrides
from ..selection import encode_correct
from ..space import SearchSpaceFile, flat_config, suggest
from ..storage import Location, is_uri
from .resources import task_concurrency
from .results import STAGE1_TRIAL, VAL_CORRECT, rank_trials, sampled_values, trial_row
from .studies import Studies
from .tune_phase import make_sampler, results_table, run_phase

__all__ = ["STAGE1_RUN", "cached_features", "finished_stage1_run", "run_staged", "search_stage2"]

STAGE1_RUN = "stage1_run"  # trial id of the stage-1 run that `search.staged.stage1_run` names


def cached_features(config: ExperimentConfig, checkpoint: str, views: int) -> dict:
    """Ray task: `features.cache_features` of a stage-1 checkpoint folder, a local path or a URI (copied to
    the task's node first)."""
    from ..features import cache_features

    if not is_uri(checkpoint):
        return cache_features(config, checkpoint, views)
    with tempfile.TemporaryDirectory() as tmp:
        return cache_features(config, Location(checkpoint).download(Path(tmp) / "checkpoint"), views)


def _fit_stage2(cache: dict, config: dict) -> tuple[list[dict], dict, dict | None]:
    """Ray task: one stage-2 trial (or tau evaluation) on cached features. Returns its scalar results, one
    per epoch, the per-class accuracies of its last epoch and that epoch's per-image validation correctness
    (`selection.encode_correct`: a bit an image, for the classifier and its tau-normalised copy; None
    without a validation set)."""
    from ..features import fit_classifier

    started, history = time.time(), []

    def report(metrics: dict) -> None:
        now = time.time()
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict)) and k != "val_correct"}
        history.append({**scalars, "timestamp": now, "time_total_s": now - started})

    last = fit_classifier(cache, ExperimentConfig.model_validate(config), report=report)
    correct = last.get("val_correct")
    return (history, {k: v for k, v in last.items() if k.endswith("per_class_acc")},
            None if correct is None else encode_correct(correct.numpy()))


def _stage2_epochs(config: ExperimentConfig) -> int:
    """Epochs of a stage-2 trial: its training epochs, or one evaluation when stage 2 is off (tau only)."""
    return config.stage2.epochs if config.stage2.enabled else 1


def search_stage2(exp: Location, spec: SearchSpaceFile, keys: list[str], parents: dict[str, dict], caches: dict,
                  cluster: dict, resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The second phase: each trial picks a stage-1 parent (`parents`: trial id -> its config; `caches`:
    trial id -> its cached features), then samples `keys`, whose `when` conditions are checked against
    that parent's configuration (so a condition on a stage-1 key sees the parent's sampled value)."""
    settings, studies = spec.search, Studies(exp, spec.search.optuna_storage)
    study = optuna.create_study(
        study_name=studies.name("stage2"), storage=studies.storage(), sampler=make_sampler(settings),
        load_if_exists=resume,
        directions=["maximize" if d == "max" else "minimize" for d in settings.directions])
    finished = [t for t in study.get_trials(deepcopy=False) if "history" in t.user_attrs or "error" in t.user_attrs]
    for ot_trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        history = ot_trial.user_attrs.get("history")
        if history is None:  # interrupted before it finished (or errored, and counted in `finished`)
            study.tell(ot_trial.number, state=optuna.trial.TrialState.FAIL)
        else:  # finished, but the driver stopped between storing its results and its tell
            study.tell(ot_trial.number, [history[-1].get(m, math.nan) for m in settings.metrics])
    fit = ray.remote(_fit_stage2).options(num_cpus=settings.resources.cpus_per_worker)
    concurrent, num_samples = task_concurrency(settings, cluster), settings.staged.num_samples
    space = {k: spec.space[k] for k in keys}
    pending: dict[ray.ObjectRef, optuna.Trial] = {}
    launched, last_print = len(finished), 0.0
    while launched < num_samples or pending:
        while launched < num_samples and len(pending) < concurrent:
            ot_trial = study.ask()
            parent = ot_trial.suggest_categorical(STAGE1_TRIAL, list(parents))
            parent_config = ExperimentConfig.model_validate(parents[parent])
            suggest(ot_trial, space, flat_config(parent_config))
            sampled = {k: v for k, v in ot_trial.params.items() if k != STAGE1_TRIAL}
            config = with_overrides(parent_config, {"stage2.enabled": spec.base.stage2.enabled, **sampled})
            pending[fit.remote(caches[parent], config.model_dump())] = ot_trial
            launched += 1
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        ot_trial = pending.pop(ref)
        try:
            history, per_class, correct = ray.get(ref)
        except ray.exceptions.RayError as err:
            ot_trial.set_user_attr("error", str(err).strip().splitlines()[-1][:300])
            study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        else:
            if correct is not None:  # before `history`, which marks the trial's results as stored
                ot_trial.set_user_attr(VAL_CORRECT, correct)
            ot_trial.set_user_attr("history", history)
            ot_trial.set_user_attr("per_class", per_class)
            study.tell(ot_trial, [history[-1].get(m, math.nan) for m in settings.metrics])
        finished.append(ot_trial)
        if time.time() - last_print > 5 or launched == num_samples and not pending:
            last_print = time.time()
            studies.save()  # a mirrored SQLite study: what a hard kill of the driver can lose is redrawn
            print(f"stage 2: {len(finished)}/{num_samples} trials finished, {len(pending)} running", flush=True)
    studies.save()
    return stage2_tables(study, spec, keys)


def stage2_tables(study: optuna.Study, spec: SearchSpaceFile, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results.csv and history.csv rows of the stage-2 phase, from its Optuna study."""
    planned = _stage2_epochs(spec.base)
    rows, history = [], []
    for ot_trial in study.get_trials(deepcopy=False):
        if "history" not in ot_trial.user_attrs and "error" not in ot_trial.user_attrs:
            continue  # interrupted, redrawn
        trial_id = f"stage2_{ot_trial.number:05d}"
        frame = pd.DataFrame(ot_trial.user_attrs.get("history", []))
        if len(frame):
            frame.insert(0, "trial_id", trial_id)
            history.append(frame)
        values = {k: ot_trial.params.get(k) for k in [STAGE1_TRIAL, *keys]}
        row = trial_row(trial_id, values, frame, ot_trial.user_attrs.get("error"), spec.search, planned,
                        pruner=None)
        row[VAL_CORRECT] = ot_trial.user_attrs.get(VAL_CORRECT)  # taken out before results.csv is written
        rows.append(row)
    return pd.DataFrame(rows), (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def finished_stage1_run(spec: SearchSpaceFile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage-1 table and history of `search.staged.stage1_run`, a finished `python -m ltsearch train` run,
    as one trial (`stage1_run`). Its data, model and stage-1 settings must be those of the space's `base`, so
    that the file says what stage 2 builds on."""
    import torch

    from ..files import CHECKPOINT_FILE

    checkpoint = Path(spec.search.staged.stage1_run) / "checkpoint"
    if not (checkpoint / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"search.staged.stage1_run: {checkpoint / CHECKPOINT_FILE} not found (expected the "
                          "--out folder of a finished `python -m ltsearch train` run)")
    state = torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    run_config = ExperimentConfig.model_validate(state["config"])
    ours, theirs = flat_config(spec.base), flat_config(run_config)
    compared = [k for k in ours if k.startswith(("data.", "model.", "stage1.")) and k not in ("data.root", "data.download")]
    for key in compared:
        if ours[key] != theirs[key]:
            raise ConfigError(f"search.staged.stage1_run: {checkpoint} was trained with {key}={theirs[key]!r}, "
                              f"but the space's base has {ours[key]!r}")
    if state["stage"] != 1 or state["stage_epoch"] != run_config.stage1.epochs:
        raise ConfigError(f"search.staged.stage1_run: {checkpoint} is not a finished stage 1 (stage "
                          f"{state['stage']}, epoch {state['stage_epoch']} of {run_config.stage1.epochs}); "
                          "finish it with `python -m ltsearch train ... --resume`")
    frame = pd.DataFrame([{k: v for k, v in m.items() if not isinstance(v, (list, dict))}
                          for m in state["history"] if m.get("stage", 1) == 1])
    row = trial_row(STAGE1_RUN, {}, frame, None, spec.search, run_config.stage1.epochs, pruner=None)
    row["checkpoint"] = str(checkpoint)
    frame.insert(0, "trial_id", STAGE1_RUN)
    return pd.DataFrame([row]), frame


def run_staged(exp: Location, spec: SearchSpaceFile, cluster: dict, resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Search stage 1 (or take `search.staged.stage1_run`); cache features of its top-k checkpoints, ranked by
    the first search metric at each trial's best-by-validation epoch (the checkpoint stage 2 starts from);
    search stage 2 (and tau) on them. The table has a `phase` column; stage-2 rows carry their stage-1
    parent's values."""
    settings, staged = spec.search, spec.search.staged
    stage1_keys, stage2_keys = spec.sample_keys("stage1"), spec.sample_keys("stage2")
    base1 = with_overrides(spec.base, {"stage2.enabled": False})
    if staged.stage1_run is None:
        grid1 = run_phase(exp, "stage1", spec, {k: spec.space[k] for k in stage1_keys}, base1,
                          settings.num_samples if stage1_keys else 1, spec.max_epochs("stage1"), cluster, resume)
        table1, history1 = results_table(grid1, settings, stage1_keys, base1)
    else:
        table1, history1 = finished_stage1_run(spec)
    table1.insert(0, "phase", "stage1")
    history1.insert(0, "phase", "stage1")
    ranked = rank_trials(table1, settings, "best").head(staged.top_k)
    if not len(ranked):
        print(f"Stage 2 skipped: no stage-1 trial has a value of {settings.metrics[0]} (see results.csv)",
              flush=True)
        return table1, history1
    parents, caches = {}, {}
    remote_cache = ray.remote(cached_features).options(num_cpus=settings.resources.cpus_per_worker)
    for _, row in ranked.iterrows():
        config = with_overrides(base1, sampled_values(row, stage1_keys))
        parents[row["trial_id"]] = config.model_dump()
        caches[row["trial_id"]] = remote_cache.remote(config, row["checkpoint"], staged.views)
    print(f"Stage 2 on cached features of stage-1 trials {list(caches)} ({staged.views} views each)", flush=True)
    table2, history2 = search_stage2(exp, spec, stage2_keys, parents, caches, cluster, resume)
    by_id = table1.set_index("trial_id")
    for key in stage1_keys if len(table2) else []:
        table2[key] = [by_id.at[p, key] for p in table2[STAGE1_TRIAL]]
    table2.insert(0, "phase", "stage2")
    history2.insert(0, "phase", "stage2")
    return pd.concat([table1, table2], ignore_index=True), pd.concat([history1, history2], ignore_index=True)
