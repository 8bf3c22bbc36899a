"""One experiment folder, from start (or resume) to its result files.

`storage` is a local folder (shared, e.g. NFS, when several nodes run trials) or an object-storage URI
(`s3://bucket/prefix`, `gs://...`: `ltsearch.storage`); every file below goes through the same layer.
Layout of `storage/name/`:
    space.yaml          the resolved search-space file this experiment runs
    optuna.db           the Optuna studies (SQLite; `optuna-dashboard sqlite:///optuna.db`), unless
                        `search.optuna_storage` names a database server (`studies.py`)
    search/ | stage1/   Ray Tune's own experiment folder (trial results, checkpoints); a staged search's
                        second phase runs as Ray tasks and keeps its results in optuna.db (study stage2)
    train/              Ray Train runs of multi-worker trials
    confirm/            Tune's folder of the confirmation phase (`search.confirm`), when on; and
    confirm_plan.json   the configurations it re-trains (so that --resume continues the same ones)
    results.csv         one row per trial (with the validation noise: interval and ties, see
                        ltsearch.selection), then one `phase: confirm` row per confirmed configuration
    confirm.csv         the confirmation's runs: one row per confirmed configuration and seed
    history.csv         one row per trial and epoch (confirmation runs too, `phase: confirm`)
    best_config.yaml    the resolved experiment config of the best trial (selected on validation: the best
                        mean over seeds when confirmation is on)
    summary.json        best trial, its val and test metrics, its checkpoint, paths; the validation set's
                        size and noise; the search's pick against the confirmed one
"""
from __future__ import annotations

import errno
import io
import json
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

import numpy as np
import optuna
import pandas as pd
import ray
import yaml

from ..build import load_data
from ..config import ConfigError, ExperimentConfig, with_overrides
from ..data import LongTailData
from ..files import PREDICTIONS_FILE
from ..metrics import class_groups, is_missing
from ..selection import CONFIDENCE, confirmation_summary, decode_correct, metric_group, unpack_correct
from ..space import SearchSpaceFile
from ..storage import Location, StorageError
from .confirm import CONFIRM_PHASE, run_confirm
from .lazy_test import fill_best_test, selected_trials
from .resources import trial_resources
from .results import VAL_CORRECT, add_validation_noise, best_row, plain, sampled_values
from .staged import run_staged
from .studies import Studies
from .tune_phase import results_table, run_phase

__all__ = ["EXPERIMENT_MARKER", "SearchResult", "connect", "run_search"]

EXPERIMENT_MARKER = "space.yaml"


@dataclass
class SearchResult:
    path: Path | Location  # the experiment: a local folder, or its Location in object storage
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


def _check_resumable(exp: Location, spec: SearchSpaceFile) -> None:
    """`--resume` continues the experiment only with the same search-space file it started with."""
    if not (exp / EXPERIMENT_MARKER).is_file():
        raise ConfigError(f"--resume: {exp} holds no ltsearch experiment (no {EXPERIMENT_MARKER})")
    stored = yaml.safe_load((exp / EXPERIMENT_MARKER).read_text())
    given = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))
    changed = _first_difference(stored, given)
    if changed:
        raise ConfigError(f"--resume: {changed}: differs from the experiment's {exp / EXPERIMENT_MARKER} "
                          "(resume with the same space file and --set values, or start a new --name)")


def run_search(spec: SearchSpaceFile, *, storage: str | Path = "runs", name: str | None = None,
               address: str | None = None, dashboard_host: str = "127.0.0.1", resume: bool = False,
               source: str = "space") -> SearchResult:
    """Run (or resume) the search described by `spec`; return its results table and best trial.

    The experiment folder is created only once the data loads, the cluster answers and can hold a trial,
    so a failed start leaves nothing behind that a rerun with the same `--name` would trip over: the storage
    (a writable folder, or a store that answers, with its bucket and credentials) and the Optuna database
    are checked first."""
    data = load_data(spec.base)  # a missing or corrupt dataset is refused (or downloaded once) before Ray starts
    if resume and name is None:
        raise ConfigError("--resume needs --name (the experiment to continue)")
    name = name or f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        exp = Location(storage) / name
        exp.check_creatable()
        if resume:
            _check_resumable(exp, spec)
        elif exp.exists() if exp.is_local else exp.children():  # a store may keep an empty folder marker
            raise ConfigError(f"--name: {exp} already exists; pass --resume to continue it or another --name")
    except StorageError as err:
        raise ConfigError(f"--storage: {err}") from None
    studies = Studies(exp, spec.search.optuna_storage)
    studies.check()

    info = connect(address, dashboard_host)
    trial_resources(spec.search, info["resources"])  # a trial the cluster cannot hold is refused here
    if not resume:
        try:
            exp.mkdir()
        except OSError as err:
            raise ConfigError(f"--storage: cannot create {exp}: {err.strerror or err}") from None
        (exp / EXPERIMENT_MARKER).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    if info["dashboard_url"]:
        print(dashboard_hint(info["dashboard_url"]), flush=True)
    print(f"Experiment: {exp}", flush=True)
    print(studies.start(resume), flush=True)
    try:
        return _search(exp, spec, info["resources"], data, resume)
    except Exception as err:
        if not _no_space(err):
            raise
        raise ConfigError(f"--storage: {exp}: no space left on device; the search stopped and what it wrote is "
                          f"kept: free space, then continue with --resume --name {name}") from None
    finally:
        try:
            studies.save()
        except OSError as err:  # must not hide the error that ended the search
            print(f"Optuna studies: not copied to {exp} at exit ({err})", flush=True)


def _no_space(err: BaseException | None) -> bool:
    """Whether `err` or an error behind it is a full filesystem: an OSError (ENOSPC, EDQUOT), SQLite's
    "database or disk is full" (optuna.db) or a remote error's text (a trial's checkpoint upload)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in ("database or disk is full", "No space left on device")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _search(exp: Location, spec: SearchSpaceFile, cluster: dict, data: LongTailData, resume: bool) -> SearchResult:
    """The search's phases and its result files, in the experiment folder `exp`."""
    settings, started = spec.search, time.time()
    if settings.mode == "joint":
        grid = run_phase(exp, "search", spec, spec.space, spec.base, settings.num_samples, spec.max_epochs(),
                         cluster, resume)
        table, history = results_table(grid, settings, list(spec.space), spec.base)
    else:
        table, history = run_staged(exp, spec, cluster, resume)
    table = fill_best_test(table, selected_trials(table, settings), spec, cluster)  # lazy test evaluation's gap
    images = _validation_images(spec, table, data.class_counts)
    correct = _validation_correct(spec, table, len(data.val_y))
    table = table.drop(columns=VAL_CORRECT, errors="ignore")
    val_groups = {g: np.isin(np.asarray(data.val_y), c) for g, c in class_groups(data.class_counts).items()}
    table, note = add_validation_noise(table, settings, images, _metric_classes(spec, data.class_counts), correct,
                                       val_groups)
    if note:
        print(f"Validation noise: {note}", flush=True)
    runs = runs_history = None
    if settings.confirm is not None:
        runs, runs_history = run_confirm(exp, spec, table, cluster, resume)
    validation = {"images": images_of(spec.base, data.class_counts), "per_class": spec.base.data.val_per_class,
                  "confidence": CONFIDENCE, "note": note}
    table, best = _write_results(exp, spec, table, history, time.time() - started, runs=runs,
                                 runs_history=runs_history, validation=validation)
    return SearchResult(path=exp.local_path if exp.is_local else exp, results=table, best=best)


def images_of(config: ExperimentConfig, class_counts: list[int]) -> dict[str, int]:
    """Validation images overall and per class group ("many", ..., "tail") of a data configuration: the
    validation set is balanced, `data.val_per_class` images of every class."""
    per_class = config.data.val_per_class
    groups = class_groups(class_counts)
    return {"overall": per_class * len(class_counts), **{g: per_class * len(c) for g, c in groups.items()}}


def _validation_images(spec: SearchSpaceFile, table: pd.DataFrame, class_counts: list[int]) -> list[dict]:
    """Per results row, `images_of` its data configuration (the base's, unless `data.*` keys are searched)."""
    base = images_of(spec.base, class_counts)
    data_keys = [k for k in spec.space if k.startswith("data.")]
    if not data_keys:
        return [base] * len(table)
    known: dict[str, dict] = {}
    out = []
    for _, row in table.iterrows():
        config = with_overrides(spec.base, sampled_values(row, data_keys))
        key = config.data.model_dump_json()
        if key not in known:
            known[key] = images_of(config, load_data(config).class_counts)
        out.append(known[key])
    return out


def _validation_correct(spec: SearchSpaceFile, table: pd.DataFrame, images: int) -> pd.Series | None:
    """Per results row, its per-image validation correctness for the paired tie test ({"last": ..., "best":
    ...}, see `add_validation_noise`): a stage-2 row's record, or the `PREDICTIONS_FILE` beside a trial's
    checkpoint; None where neither is there (an older trial). None for every row when `data.*` keys are
    searched: the trials' validation sets then differ, and only the unpaired rule applies."""
    if any(k.startswith("data.") for k in spec.space):
        return None
    out = pd.Series(None, index=table.index, dtype=object)
    for index, row in table.iterrows():
        record = row.get(VAL_CORRECT)
        if isinstance(record, dict):
            correct = decode_correct(record)
            out.at[index] = {"last": correct} if correct.shape == (2, images) else None
        else:
            out.at[index] = _checkpoint_correct(row.get("checkpoint"), images)
    return out


def _checkpoint_correct(checkpoint, images: int) -> dict | None:
    """{"last": ..., "best": ...} from the `PREDICTIONS_FILE` in a checkpoint folder (path or URI); None when
    there is none or it is not of a validation set of `images` images."""
    if not isinstance(checkpoint, str):
        return None
    try:
        packed = np.load(io.BytesIO((Location(checkpoint) / PREDICTIONS_FILE).read_bytes()))
    except (OSError, StorageError, ValueError):
        return None
    if packed.shape != (2, 2, math.ceil(images / 8)):
        return None
    correct = unpack_correct(packed, images)
    return {"last": correct[0], "best": correct[1]}


def _metric_classes(spec: SearchSpaceFile, class_counts: list[int]) -> int | None:
    """Classes behind the objective (all, or those of its group), to say validation sizes per class."""
    group = metric_group(spec.search.metrics[0])
    if group is None:
        return None
    return len(class_counts) if group == "overall" else len(class_groups(class_counts).get(group, [])) or None


def confirmation_rows(table: pd.DataFrame, runs: pd.DataFrame, spec: SearchSpaceFile) -> pd.DataFrame:
    """results.csv's `phase: confirm` rows: one per confirmed configuration, best mean first, with its
    search trial's values and single-run objective next to the mean and std over seeds."""
    summary = confirmation_summary(runs, spec.search.directions[0])
    if summary.empty:
        return summary
    by_id = table.set_index("trial_id")
    keys = [k for k in ("stage1_trial", *spec.space) if k in by_id]
    rows = []
    for _, confirmed in summary.iterrows():
        source = by_id.loc[confirmed["confirmed_trial"]]
        failed = confirmed["runs"] - confirmed["runs_ok"]
        rows.append({
            "phase": CONFIRM_PHASE, "trial_id": f"{CONFIRM_PHASE}_{confirmed['confirmed_trial']}",
            **{k: source[k] for k in keys}, **confirmed.to_dict(),
            "search_objective": source["objective"], "search_objective_lo": source.get("objective_lo"),
            "search_objective_hi": source.get("objective_hi"),
            "status": "ERROR" if confirmed["runs_ok"] == 0 else "TERMINATED",
            "stop_reason": (f"confirmed over {confirmed['runs_ok']} seeds" if not failed else
                            f"{failed} of {confirmed['runs']} seed runs failed (confirm.csv)")})
    return pd.DataFrame(rows)


def _write_results(exp: Location, spec: SearchSpaceFile, table: pd.DataFrame, history: pd.DataFrame,
                   wall_time_s: float, runs: pd.DataFrame | None = None, runs_history: pd.DataFrame | None = None,
                   validation: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Write results.csv, history.csv, best_config.yaml and summary.json (and, with confirmation runs,
    confirm.csv); return results.csv's table and the best row. The best configuration is the search's best
    trial by validation or, with confirmation runs, the confirmed configuration with the best mean
    validation objective over its seeds."""
    search_best = best_row(table, spec.search)
    best, confirmed = search_best, None
    studies = Studies(exp, spec.search.optuna_storage)
    summary: dict[str, Any] = {"experiment": str(exp), "num_trials": len(table),
                               "wall_time_s": wall_time_s, "metric": spec.search.metrics,
                               "optuna_storage": studies.shown_url()}
    if validation is not None:
        summary["validation"] = validation
    if runs is not None:
        confirmed = confirmation_rows(table, runs, spec) if len(runs) else pd.DataFrame()
        (exp / "confirm.csv").write_text(runs.to_csv(index=False))
        picked = confirmed.iloc[0] if len(confirmed) and confirmed.iloc[0]["runs_ok"] > 0 else None
        if picked is not None:
            best = table.set_index("trial_id").loc[picked["confirmed_trial"]].copy()
            best["trial_id"] = picked["confirmed_trial"]
        _print_confirmation(confirmed, search_best, spec)
        summary["confirm"] = {
            "seeds": spec.search.confirm.seeds, "top_k": spec.search.confirm.top_k,
            "search_pick": None if search_best is None else plain(search_best["trial_id"]),
            "confirmed_pick": None if picked is None else plain(picked["confirmed_trial"]),
            "configurations": [{k: plain(v) for k, v in r.items() if not _missing(v)}
                               for r in confirmed.to_dict("records")]}
        if "phase" not in table:
            table = table.assign(phase="search")[["phase", *table.columns]]
            history = history.assign(phase="search")[["phase", *history.columns]] if len(history) else history
        table = pd.concat([table, confirmed], ignore_index=True)
        if runs_history is not None and len(runs_history):
            history = pd.concat([history, runs_history], ignore_index=True)
    (exp / "results.csv").write_text(table.to_csv(index=False))
    (exp / "history.csv").write_text(history.to_csv(index=False))
    if best is not None:
        best_config = with_overrides(spec.base, sampled_values(best, list(spec.space)))
        (exp / "best_config.yaml").write_text(yaml.safe_dump(best_config.model_dump(), sort_keys=False))
        summary["best"] = {k: plain(v) for k, v in best.items() if not _missing(v)}
        if confirmed is not None and len(confirmed):
            summary["best"]["confirmed"] = {k: plain(v) for k, v in confirmed.iloc[0].items() if not _missing(v)}
    if len(spec.search.metrics) > 1:
        _write_pareto(exp, spec, studies)
    (exp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return table, summary.get("best", {})


def _missing(value) -> bool:
    """None, NaN or pandas' NA (an unknown tie verdict): left out of summary.json."""
    return is_missing(value) or value is pd.NA


def _print_confirmation(confirmed: pd.DataFrame, search_best: pd.Series | None, spec: SearchSpaceFile) -> None:
    metric = spec.search.metrics[0]
    if confirmed.empty:
        print("Confirmation: no run finished; the search's best trial stays the choice", flush=True)
        return
    print(f"Confirmation over seeds {spec.search.confirm.seeds} ({metric}, validation; mean ± std over seeds):",
          flush=True)
    for _, row in confirmed.iterrows():
        std = "" if is_missing(row["std_objective"]) else f" ± {row['std_objective']:.2f}"
        print(f"  {row['confirmed_trial']}: {row['mean_objective']:.2f}{std} "
              f"({row['runs_ok']}/{row['runs']} runs; search run {row['search_objective']:.2f})", flush=True)
    pick = confirmed.iloc[0]["confirmed_trial"]
    if confirmed.iloc[0]["runs_ok"] == 0:
        print("Confirmation: every run failed; the search's best trial stays the choice", flush=True)
    elif search_best is not None and pick != search_best["trial_id"]:
        print(f"Confirmation changed the choice: {pick} (best mean), not the search's pick "
              f"{search_best['trial_id']}", flush=True)
    else:
        print(f"Confirmation kept the search's pick: {pick}", flush=True)


def _write_pareto(exp: Location, spec: SearchSpaceFile, studies: Studies) -> None:
    """The Optuna studies' Pareto fronts (multi-objective searches) as `pareto.csv`."""
    storage = studies.storage()
    frames = []
    for summary in optuna.get_all_study_summaries(storage):
        phase = studies.phase_of(summary.study_name)
        if phase is None:
            continue  # another experiment's study in a shared database
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if len(study.directions) < 2:
            continue
        for t in study.best_trials:
            frames.append({"study": phase, "optuna_trial": t.number, **t.params,
                           **dict(zip(spec.search.metrics, t.values))})
    (exp / "pareto.csv").write_text(pd.DataFrame(frames).to_csv(index=False))
