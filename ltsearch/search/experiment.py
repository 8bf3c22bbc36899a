"""One experiment folder, from start (or resume) to its result files.

Layout of `storage/name/`:
    space.yaml          the resolved search-space file this experiment runs
    optuna.db           the Optuna studies (SQLite; `optuna-dashboard sqlite:///optuna.db`)
    search/ | stage1/   Ray Tune's own experiment folder (trial results, checkpoints); a staged search's
                        second phase runs as Ray tasks and keeps its results in optuna.db (study stage2)
    train/              Ray Train runs of multi-worker trials
    results.csv         one row per trial; history.csv one row per trial and epoch
    best_config.yaml    the resolved experiment config of the best trial (selected on validation)
    summary.json        best trial, its val and test metrics, its checkpoint, paths
"""
from __future__ import annotations

import json
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

from ..config import ConfigError, with_overrides
from ..data import load_data
from ..files import atomic_write_text
from ..metrics import is_missing
from ..space import SearchSpaceFile
from .resources import trial_resources
from .results import best_row, plain, sampled_values
from .staged import run_staged
from .tune_phase import results_table, run_phase, study_storage

__all__ = ["EXPERIMENT_MARKER", "SearchResult", "connect", "run_search"]

EXPERIMENT_MARKER = "space.yaml"


@dataclass
class SearchResult:
    path: Path
    results: pd.DataFrame
    best: dict[str, Any]


def connect(address: str | None = None, dashboard_host: str = "127.0.0.1") -> dict:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray in this process with its
    dashboard on `dashboard_host` (loopback unless the caller passes another interface). Ray's own
    gRPC ports follow Ray's defaults; token authentication guards them (see docs/reliability.md).
    Returns the cluster's resources and dashboard URL."""
    url = None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": "WARNING"}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            context = ray.init(address=address, **kwargs)
        else:
            context = ray.init(include_dashboard=True, dashboard_host=dashboard_host, **kwargs)
        url = context.dashboard_url
    return {"resources": ray.cluster_resources(), "dashboard_url": url}


def dashboard_hint(url: str) -> str:
    """The dashboard line printed at start: the URL, and what to paste into its token prompt."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
    return (f"Ray dashboard: http://{url} (it asks for a token: `ray get-auth-token` prints it; "
            f"it is the contents of {token_file})")


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The dotted path of the first value that differs between two parsed YAML documents, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if old == new else where


def _check_resumable(exp: Path, spec: SearchSpaceFile) -> None:
    """`--resume` continues the experiment only with the same search-space file it started with."""
    if not (exp / EXPERIMENT_MARKER).exists():
        raise ConfigError(f"--resume: {exp} holds no ltsearch experiment (no {EXPERIMENT_MARKER})")
    stored = yaml.safe_load((exp / EXPERIMENT_MARKER).read_text())
    given = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))
    changed = _first_difference(stored, given)
    if changed:
        raise ConfigError(f"--resume: {changed}: differs from the experiment's {exp / EXPERIMENT_MARKER} "
                          "(resume with the same space file and --set values, or start a new --name)")


def _check_creatable(exp: Path) -> None:
    """Refuse, before Ray starts, a folder that cannot be made: its nearest existing ancestor must be a
    writable folder. (It is made only once the cluster answers.)"""
    ancestor = exp.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--storage: cannot create {exp}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--storage: cannot create {exp}: {ancestor} is not writable")


def run_search(spec: SearchSpaceFile, *, storage: str | Path = "runs", name: str | None = None,
               address: str | None = None, dashboard_host: str = "127.0.0.1", resume: bool = False,
               source: str = "space") -> SearchResult:
    """Run (or resume) the search described by `spec`; return its results table and best trial.

    The experiment folder is created only once the data loads, the cluster answers and can hold a trial,
    so a failed start leaves nothing behind that a rerun with the same `--name` would trip over."""
    storage = Path(storage).expanduser().resolve()
    load_data(spec.base)  # a missing or corrupt dataset is refused (or downloaded once) before Ray starts
    if resume:
        if name is None:
            raise ConfigError("--resume needs --name (the experiment to continue)")
        exp = storage / name
        _check_resumable(exp, spec)
    else:
        name = name or f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp = storage / name
        if exp.exists():
            raise ConfigError(f"--name: {exp} already exists; pass --resume to continue it or another --name")
        _check_creatable(exp)

    info = connect(address, dashboard_host)
    trial_resources(spec.search, info["resources"])  # a trial the cluster cannot hold is refused here
    if not resume:
        try:
            exp.mkdir(parents=True)
        except OSError as err:
            raise ConfigError(f"--storage: cannot create {exp}: {err.strerror}") from None
        atomic_write_text(exp / EXPERIMENT_MARKER, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    if info["dashboard_url"]:
        print(dashboard_hint(info["dashboard_url"]), flush=True)
    print(f"Experiment: {exp}", flush=True)
    cluster, settings, started = info["resources"], spec.search, time.time()
    if settings.mode == "joint":
        grid = run_phase(exp, "search", spec, spec.space, spec.base, settings.num_samples, spec.max_epochs(),
                         cluster, resume)
        table, history = results_table(grid, settings, list(spec.space), spec.base)
    else:
        table, history = run_staged(exp, spec, cluster, resume)
    best = _write_results(exp, spec, table, history, time.time() - started)
    return SearchResult(path=exp, results=table, best=best)


def _write_results(exp: Path, spec: SearchSpaceFile, table: pd.DataFrame, history: pd.DataFrame,
                   wall_time_s: float) -> dict:
    atomic_write_text(exp / "results.csv", table.to_csv(index=False))
    atomic_write_text(exp / "history.csv", history.to_csv(index=False))
    best = best_row(table, spec.search)
    summary: dict[str, Any] = {"experiment": str(exp), "num_trials": len(table),
                               "wall_time_s": wall_time_s, "metric": spec.search.metrics}
    if best is not None:
        best_config = with_overrides(spec.base, sampled_values(best, list(spec.space)))
        atomic_write_text(exp / "best_config.yaml", yaml.safe_dump(best_config.model_dump(), sort_keys=False))
        summary["best"] = {k: plain(v) for k, v in best.items() if not is_missing(v)}
    if len(spec.search.metrics) > 1:
        _write_pareto(exp, spec)
    atomic_write_text(exp / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary.get("best", {})


def _write_pareto(exp: Path, spec: SearchSpaceFile) -> None:
    """The Optuna studies' Pareto fronts (multi-objective searches) as `pareto.csv`."""
    storage = study_storage(exp)
    frames = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if len(study.directions) < 2:
            continue
        for t in study.best_trials:
            frames.append({"study": summary.study_name, "optuna_trial": t.number, **t.params,
                           **dict(zip(spec.search.metrics, t.values))})
    atomic_write_text(exp / "pareto.csv", pd.DataFrame(frames).to_csv(index=False))
