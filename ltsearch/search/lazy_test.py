"""Lazy test evaluation in a search: test figures only where a result reads them (`trainer.test_every: rungs`).

A search reads a trial's test figures at two epochs: its last (the figures plot final test accuracy) and its
best-by-validation epoch (results.csv's `best_*` columns; a staged search hands that epoch's checkpoint to
stage 2 and prints its test accuracy). A trial ends at its planned last epoch, or where ASHA stops it, and
ASHA stops trials only at its rungs. So a phase's trials get `test_every: rungs` with ASHA's rungs as
`test_epochs` (`auto`, the default, becomes that here; none without ASHA, and in the confirmation's grid):
the trainer evaluates test at the rungs and at each stage's end, where it also evaluates the stage's best
epoch from its kept model when that had none (`ltsearch.train`).

Left without test figures: the best epoch of a trial ASHA stopped before its stage's end, when it was no rung.
`fill_best_test` recomputes those for the trials the search selects (`selected_trials`: the best by the final
objective, or the top `confirm.top_k` it re-trains; in a staged search the stage-1 parents, whose best epoch
stage 2 builds on and the stage summary reports), from the trial's last checkpoint, which keeps that epoch's
model, in Ray tasks after the phase. Other stopped trials keep those columns missing: nothing reads them but
a table of every trial, and recomputing them all would cost the test passes lazy evaluation saved. The
selection is made before and only on validation figures; the test figures are reported, never used to select.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from ..config import ExperimentConfig, with_overrides
from ..files import CHECKPOINT_FILE
from ..metrics import is_missing
from ..space import Scheduler, SearchSettings, SearchSpaceFile
from ..storage import Location
from .resources import trial_resources
from .results import rank_trials, sampled_values, selection_rows

__all__ = ["asha_rungs", "best_test", "fill_best_test", "lazy_test_config", "selected_trials", "trial_config"]


def asha_rungs(scheduler: Scheduler, max_epochs: int) -> list[int]:
    """The global epochs at which ASHA (`time_attr` epoch, one bracket, horizon `max_epochs`) compares a trial
    with the others and may stop it: for each milestone grace_period * reduction_factor**k up to the horizon,
    the first epoch that reaches it (a trial reports every epoch). Milestones are computed as Ray's
    `async_hyperband._Bracket` computes them, float for float. None without ASHA."""
    if not scheduler.enabled:
        return []
    grace, factor = scheduler.grace_period, scheduler.reduction_factor
    rungs = int(np.log(max_epochs / grace) / np.log(factor) + 1)  # Ray's MAX_RUNGS (bracket s = 0)
    return sorted({math.ceil(grace * factor ** k) for k in range(max(rungs, 0))})


def lazy_test_config(base: ExperimentConfig, rungs: list[int]) -> ExperimentConfig:
    """`base` as a phase's trials run it: `test_every: auto` becomes `rungs` at `rungs`; an explicit `rungs`
    gets them added to its own `test_epochs` (a trial must have test figures where ASHA can stop it);
    `best` and `epoch` stay."""
    trainer = base.trainer
    if trainer.test_every not in ("auto", "rungs"):
        return base
    own = (trainer.test_epochs or []) if trainer.test_every == "rungs" else []
    return with_overrides(base, {"trainer.test_every": "rungs", "trainer.test_epochs": sorted({*own, *rungs})})


def selected_trials(table: pd.DataFrame, settings: SearchSettings) -> list:
    """Index labels of the rows whose best-by-validation epoch the search selects or reports as selected: a
    staged search's stage-1 parents (the `staged.top_k` best by the objective at that epoch); otherwise the
    best trial by its final objective, or with `confirm` the `confirm.top_k` it re-trains."""
    if "phase" in table and (table["phase"] == "stage1").any():
        parents = rank_trials(table[table["phase"] == "stage1"], settings, "best")
        return list(parents.head(settings.staged.top_k).index)
    top = settings.confirm.top_k if settings.confirm is not None else 1
    return list(rank_trials(selection_rows(table), settings).head(top).index)


def best_test(config: dict, checkpoint: str, epoch: int) -> tuple[dict | None, list[int]]:
    """Ray task: the test figures of global epoch `epoch`, a best-by-validation epoch kept in the checkpoint
    folder `checkpoint` (a path or a URI), by `ltsearch.train.test_best_epochs` (None when it keeps no such
    epoch), and the best epochs whose figures had to be computed. Every stage's best epoch the checkpoint keeps
    without test figures gets them, written into its best metrics there too (the report's per-class figure
    reads each stage's best epoch there)."""
    import torch

    from ..train import test_best_epochs

    path = Location(checkpoint) / CHECKPOINT_FILE
    state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=False)
    untested = [b["metrics"] for b in state["best"].values() if not b["metrics"].get("has_test")]
    figures = test_best_epochs(ExperimentConfig.model_validate(config), state)
    computed = [m["epoch"] for m in untested if m.get("recomputed_test")]
    if computed:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getvalue())  # atomic on a local disk; one object in object storage
    return figures.get(epoch), computed


def trial_config(spec: SearchSpaceFile, row: pd.Series) -> ExperimentConfig:
    """The experiment config a results row's Tune trial ran (a staged search's stage 1 without stage 2)."""
    if row.get("phase") == "stage1":
        return with_overrides(spec.base, {"stage2.enabled": False, **sampled_values(row, spec.sample_keys("stage1"))})
    return with_overrides(spec.base, sampled_values(row, list(spec.space)))


def fill_best_test(table: pd.DataFrame, rows: list, spec: SearchSpaceFile, cluster: dict) -> pd.DataFrame:
    """`table` with the missing `best_test_*` / `best_tau_test_*` figures of `rows` (index labels) recomputed
    from their checkpoints (`best_test`), one Ray task each, with a trial worker's resources, all at once; rows
    of trials stopped early are looked at even with those figures (another stage's best epoch in the checkpoint
    may lack them)."""
    if "best_test_acc" not in table or "checkpoint" not in table:
        return table  # no test set; no checkpoints (a staged search's stage-2 table)
    todo = [i for i in rows if isinstance(table.at[i, "checkpoint"], str) and not is_missing(table.at[i, "best_epoch"])
            and (is_missing(table.at[i, "best_test_acc"]) or str(table.at[i, "stop_reason"]).startswith("stopped"))]
    if not todo:
        return table
    worker, _ = trial_resources(spec.search, cluster)
    jobs = {}
    for i in todo:
        config = trial_config(spec, table.loc[i])
        if config.trainer.num_threads is None:  # as `trials.trial` runs a trial
            config = with_overrides(config, {"trainer.num_threads": max(1, int(worker["CPU"]))})
        if not worker["GPU"] and config.trainer.device == "auto":
            config = with_overrides(config, {"trainer.device": "cpu"})
        jobs[i] = (config.model_dump(), table.at[i, "checkpoint"], int(table.at[i, "best_epoch"]))
    table = table.copy()
    for i, outcome in _run_tasks(jobs, worker).items():
        trial, epoch = table.at[i, "trial_id"], jobs[i][2]
        figures, computed = (None, []) if isinstance(outcome, str) else outcome
        if figures is None and is_missing(table.at[i, "best_test_acc"]):
            why = outcome if isinstance(outcome, str) else "its checkpoint keeps no such best epoch"
            print(f"Test figures of {trial}'s best epoch {epoch}: not recomputed ({why})", flush=True)
        for name, value in (figures or {}).items():
            if f"best_{name}" in table and not isinstance(value, list):
                table.at[i, f"best_{name}"] = math.nan if value is None else value
        if computed:
            print(f"Test figures of {trial}'s best epochs {computed} (a selected trial that ended before that "
                  "stage's end) recomputed from its checkpoint", flush=True)
    return table


def _run_tasks(jobs: dict, worker: dict) -> dict:
    """`best_test(*job)` of each of `jobs` as a Ray task with one trial worker's resources, all at once: what
    it returned, or the one-line reason it failed."""
    import ray

    task = ray.remote(best_test).options(num_cpus=worker["CPU"], num_gpus=worker["GPU"])
    refs = {i: task.remote(*job) for i, job in jobs.items()}
    out = {}
    for i, ref in refs.items():
        try:
            out[i] = ray.get(ref)
        except ray.exceptions.RayError as err:
            out[i] = str(err).strip().splitlines()[-1][:200]
    return out
