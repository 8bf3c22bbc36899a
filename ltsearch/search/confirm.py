"""The confirmation phase (`search.confirm`): re-train the search's best configurations with fresh seeds.

A search's winner is the maximum of noisy scores, so part of its lead is luck (of its seed and of the
validation set). After the search, the `top_k` best configurations by validation are re-trained once per
seed of `seeds` (`trainer.seed`, every other value unchanged) as one more Tune experiment, `confirm/`: a
grid of (configuration, seed) runs with no searcher and no early stopping, which `--resume` continues like
any Tune phase. The final choice is the best MEAN validation objective over those seeds
(`ltsearch.selection.confirmation_summary`); the search's own run is left out of the mean, since it was
selected for being high.

In staged mode a configuration is a stage-2 trial on a stage-1 parent: each parent is re-trained once per
seed (stage 1 only, a Tune trial), its best-by-validation checkpoint cached as in the search, and every
confirmed stage-2 configuration on that parent re-fitted on the new features with the same seed (Ray
tasks of a second or so; they are redone when a resumed search reaches them).
"""
from __future__ import annotations

import json

import pandas as pd
import ray

from ..config import with_overrides
from ..space import SearchSpaceFile
from ..storage import Location
from .resources import task_concurrency
from .results import STAGE1_TRIAL, rank_trials, sampled_values, selection_rows, trial_row
from .staged import _fit_stage2, _stage2_epochs, cached_features
from .tune_phase import results_table, run_grid

__all__ = ["CONFIRM_PHASE", "confirm_candidates", "run_confirm"]

CONFIRM_PHASE = "confirm"
PLAN_FILE = "confirm_plan.json"  # the configurations the confirmation re-trains, for --resume


def confirm_candidates(table: pd.DataFrame, spec: SearchSpaceFile) -> pd.DataFrame:
    """The `search.confirm.top_k` best trials by the final objective (validation), best first."""
    return rank_trials(selection_rows(table), spec.search).head(spec.search.confirm.top_k)


def _planned_candidates(exp: Location, spec: SearchSpaceFile, table: pd.DataFrame, resume: bool) -> pd.DataFrame:
    """The candidates, kept in `confirm_plan.json` once chosen: a resumed search re-trains exactly the
    configurations the interrupted confirmation started with."""
    plan = exp / PLAN_FILE
    if resume and plan.is_file():
        ids = json.loads(plan.read_text())["candidates"]
        by_id = table.set_index("trial_id", drop=False)
        return by_id.loc[[i for i in ids if i in by_id.index]].reset_index(drop=True)
    candidates = confirm_candidates(table, spec)
    plan.write_text(json.dumps({"candidates": candidates["trial_id"].tolist(), "seeds": spec.search.confirm.seeds}))
    return candidates


def run_confirm(exp: Location, spec: SearchSpaceFile, table: pd.DataFrame, cluster: dict,
                resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per confirmed configuration and seed, their per-epoch history). Each row is a result row
    of the re-trained configuration (`trial_row`) plus `confirmed_trial` (the search trial it re-trains)
    and `seed`."""
    candidates = _planned_candidates(exp, spec, table, resume)
    seeds = spec.search.confirm.seeds
    if not len(candidates):
        print("Confirmation skipped: no trial has a value of the objective (see results.csv)", flush=True)
        return pd.DataFrame(), pd.DataFrame()
    print(f"Confirmation: re-training the top {len(candidates)} configurations by "
          f"{spec.search.metrics[0]} ({', '.join(candidates['trial_id'])}) with seeds {seeds}", flush=True)
    if spec.search.mode == "staged":
        runs, history = _confirm_staged(exp, spec, candidates, seeds, cluster, resume)
    else:
        runs, history = _confirm_joint(exp, spec, candidates, seeds, cluster, resume)
    if len(history):
        history.insert(0, "phase", CONFIRM_PHASE)
    return runs, history


def _run_name(trial_id: str, seed: int) -> str:
    return f"{trial_id}-seed{seed}"


def _confirm_joint(exp: Location, spec: SearchSpaceFile, candidates: pd.DataFrame, seeds: list[int], cluster: dict,
                   resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    keys = list(spec.space)
    runs, which = {}, {}
    for seed in seeds:  # seed-major: an interrupted phase has every configuration's first seeds first
        for _, row in candidates.iterrows():
            name = _run_name(row["trial_id"], seed)
            runs[name] = {**sampled_values(row, keys), "trainer.seed": seed}
            which[name] = (row["trial_id"], seed)
    grid = run_grid(exp, CONFIRM_PHASE, spec, spec.base, runs, cluster, resume)
    table, history = results_table(grid, spec.search, keys, spec.base, runs)
    if len(table):
        table.insert(1, "confirmed_trial", [which[r][0] for r in table["run"]])
        table.insert(2, "seed", [which[r][1] for r in table["run"]])
        table = table.sort_values(["confirmed_trial", "seed"], key=_order(candidates)).reset_index(drop=True)
    return table, history


def _order(candidates: pd.DataFrame):
    """Sort key: configurations in the order of `candidates` (best first), seeds ascending."""
    rank = {t: i for i, t in enumerate(candidates["trial_id"])}
    return lambda column: column.map(rank) if column.name == "confirmed_trial" else column


def _confirm_staged(exp: Location, spec: SearchSpaceFile, candidates: pd.DataFrame, seeds: list[int],
                    cluster: dict, resume: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    settings = spec.search
    stage1_keys, stage2_keys = spec.sample_keys("stage1"), spec.sample_keys("stage2")
    base1 = with_overrides(spec.base, {"stage2.enabled": False})
    parents = {row[STAGE1_TRIAL]: sampled_values(row, stage1_keys) for _, row in candidates.iterrows()}
    runs = {_run_name(p, seed): {**values, "trainer.seed": seed}
            for seed in seeds for p, values in parents.items()}
    grid = run_grid(exp, CONFIRM_PHASE, spec, base1, runs, cluster, resume)
    table1, history1 = results_table(grid, settings, stage1_keys, base1, runs)
    stage1 = table1.set_index("run") if len(table1) else pd.DataFrame()

    cache = ray.remote(cached_features).options(num_cpus=settings.resources.cpus_per_worker)
    fit = ray.remote(_fit_stage2).options(num_cpus=settings.resources.cpus_per_worker)
    task_concurrency(settings, cluster)  # a stage-2 task the cluster cannot hold is refused, as in the search
    caches, pending = {}, []
    for seed in seeds:
        for _, row in candidates.iterrows():
            name = _run_name(row[STAGE1_TRIAL], seed)
            retrained = stage1.loc[name] if name in stage1.index else None
            failure = _stage1_failure(retrained)
            config1 = with_overrides(base1, runs[name])
            config = with_overrides(config1, {"stage2.enabled": spec.base.stage2.enabled,
                                              **sampled_values(row, stage2_keys)})
            ref = None
            if failure is None:
                if name not in caches:
                    caches[name] = cache.remote(config1, retrained["checkpoint"], settings.staged.views)
                ref = fit.remote(caches[name], config.model_dump())
            pending.append((row, seed, retrained, failure, ref))

    rows, history = [], [history1] if len(history1) else []
    planned = _stage2_epochs(spec.base)
    for row, seed, retrained, failure, ref in pending:
        trial_id, frame = _run_name(row["trial_id"], seed), None
        if ref is not None:
            try:
                result = ray.get(ref)[0]  # (history, per-class accuracies, validation correctness)
            except ray.exceptions.RayError as err:
                failure = str(err).strip().splitlines()[-1][:300]
            else:
                frame = pd.DataFrame(result)
                frame.insert(0, "trial_id", trial_id)
                history.append(frame)
        values = {STAGE1_TRIAL: row[STAGE1_TRIAL], **{k: row.get(k) for k in stage1_keys + stage2_keys}}
        out = trial_row(trial_id, values, frame, failure, settings, planned, pruner=None)
        out.update(confirmed_trial=row["trial_id"], seed=seed,
                   stage1_run=None if retrained is None else retrained["trial_id"],
                   checkpoint=None if retrained is None else retrained.get("checkpoint"))
        rows.append(out)
    table = pd.DataFrame(rows)
    order = ["trial_id", "confirmed_trial", "seed"]
    table = table[order + [c for c in table.columns if c not in order]]
    table = table.sort_values(["confirmed_trial", "seed"], key=_order(candidates)).reset_index(drop=True)
    return table, (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def _stage1_failure(retrained: pd.Series | None) -> str | None:
    """Why a re-trained stage-1 parent cannot be built on, or None."""
    if retrained is None:
        return "stage-1 re-training did not run"
    if retrained["status"] == "ERROR" or retrained["stop_reason"] != "completed":
        return f"stage-1 re-training: {retrained['stop_reason']}"
    return None
