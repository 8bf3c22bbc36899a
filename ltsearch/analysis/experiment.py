"""One experiment folder as `run_search.py` left it (results.csv, history.csv, space.yaml, summary.json,
best_config.yaml, the trials' checkpoints), read into an `Experiment`. Never imports Ray. An experiment in
object storage (`s3://...`) is read from a local copy of its result files; checkpoints are copied when a
figure needs one."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..config import ExperimentConfig, with_overrides
from ..files import CHECKPOINT_FILE
from ..selection import is_missing
from ..space import DISTRIBUTIONS, STAGE2_PREFIXES
from ..storage import Location, is_uri, local_mirror

__all__ = ["CONFIRM_ONLY", "OUTCOMES", "Experiment", "class_sizes", "load_experiment", "load_state", "same_value"]

# columns only confirmation rows have in results.csv (with the `mean_*` and `std_*` ones)
CONFIRM_ONLY = ("confirmed_trial", "confirm_rank", "seeds", "runs", "runs_ok", "search_objective",
                "search_objective_lo", "search_objective_hi")
# a trial's `outcome`, in the order figures list them
OUTCOMES = ("best by validation", "completed", "stopped early (ASHA)", "error")
# what a local copy of an experiment in object storage holds (the trials' folders stay where they are)
RESULT_FILES = ("space.yaml", "results.csv", "history.csv", "summary.json", "best_config.yaml", "confirm.csv",
                "pareto.csv", "optuna.db")


@dataclass
class Experiment:
    """One experiment folder, read. `results` gains an `outcome` column (one of OUTCOMES)."""

    path: Path
    results: pd.DataFrame  # one row per trial
    history: pd.DataFrame  # one row per trial and reported epoch
    space: dict[str, dict]  # searched key -> {"kind": "loguniform", "args": [1e-4, 1e-1]} (+ "when": {...})
    metrics: list[str]  # the search's objective(s), the first one drives ASHA and the best trial
    directions: list[str]
    stage1_epochs: int
    best_trial: str | None
    best_config: dict | None
    summary: dict
    # the confirmation phase (`search.confirm`), empty without one: one row per confirmed configuration
    # (mean and std over seeds, best mean first) and one row per confirmed configuration and seed
    confirmation: pd.DataFrame = field(default_factory=pd.DataFrame)
    confirm_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    source: str | None = None  # the URI of an experiment in object storage; `path` is then its local copy
    optuna_storage: str | None = None  # `search.optuna_storage`: a database server holding the studies
    base: dict = field(default_factory=dict)  # space.yaml's base config by dotted key: what a key not sampled ran with

    def study_storage(self) -> tuple[str | None, str]:
        """(the Optuna studies' database URL, or None when there is none; the prefix of this experiment's
        study names: empty in its own SQLite file, `<experiment URI>/` in a shared server)."""
        if self.optuna_storage:
            return self.optuna_storage, f"{self.summary.get('experiment', self.source or self.path)}/"
        db = self.path / "optuna.db"
        return (f"sqlite:///{db}" if db.is_file() else None), ""

    @property
    def name(self) -> str:
        return Location(self.source).name if self.source else self.path.name

    @property
    def objective(self) -> str:
        return self.metrics[0]

    @property
    def search_pick(self) -> str | None:
        """The trial the search alone would have chosen (its best single run by validation); the same as
        `best_trial` unless a confirmation phase chose another configuration by its mean over seeds."""
        return self.summary.get("confirm", {}).get("search_pick", self.best_trial)

    @property
    def validation_images(self) -> dict[str, int]:
        """Validation images overall and per class group ("many", ..., "tail"); empty when the search
        did not record them (searches before they were)."""
        return self.summary.get("validation", {}).get("images", {})

    def rows_sampling(self, key: str) -> pd.DataFrame:
        """The trials that sampled `key`: in a staged search, stage-2 keys come from the stage-2 phase."""
        rows = self.results
        if "phase" in rows:
            rows = rows[rows["phase"] == ("stage2" if key.startswith(STAGE2_PREFIXES) else "stage1")]
        return rows

    def sampled(self, key: str, rows: pd.DataFrame | None = None, _seen: tuple[str, ...] = ()) -> pd.Series:
        """Which of `rows` (default: `rows_sampling(key)`) sampled `key`: those where its `when` condition held
        (on the values the trial ran with; a staged search's stage-2 rows hold their parent's stage-1 values)."""
        rows = self.rows_sampling(key) if rows is None else rows
        took = pd.Series(True, index=rows.index)
        for other, wanted in self.space[key].get("when", {}).items():
            ran = self.values_ran(other, rows, (*_seen, key))
            took &= ran.map(lambda value, wanted=wanted: same_value(wanted, value)).astype(bool)
        return took

    def values_ran(self, key: str, rows: pd.DataFrame, _seen: tuple[str, ...] = ()) -> pd.Series:
        """`key`'s value in each of `rows` as the trial ran with it: the sampled one (None where None was
        sampled: results.csv holds it as a missing value), else the base config's."""
        base = self.base.get(key)
        if key not in self.space or key not in rows or key in _seen:
            return pd.Series([base] * len(rows), index=rows.index, dtype=object)
        took = self.sampled(key, rows, _seen)
        return pd.Series([(None if is_missing(v) else v) if t else base for v, t in zip(rows[key], took)],
                         index=rows.index, dtype=object)

    def final_rows(self) -> pd.DataFrame:
        """The trials the search ranks for its best configuration (staged: the stage-2 phase)."""
        rows = self.results
        return rows[rows["phase"] == "stage2"] if "phase" in rows else rows

    def checkpoint_dir(self, trial_id: str) -> Path:
        """The trial's last checkpoint; a staged stage-2 trial (no checkpoint of its own) gives its stage-1
        parent's. A folder moved since the search is found under its new location."""
        row = self.results.set_index("trial_id").loc[trial_id]
        if is_missing(row.get("checkpoint")) and not is_missing(row.get("stage1_trial")):
            return self.checkpoint_dir(row["stage1_trial"])
        if is_missing(row.get("checkpoint")):
            raise FileNotFoundError(f"trial {trial_id} has no checkpoint in {self.path / 'results.csv'}")
        if is_uri(row["checkpoint"]):
            local = self.path / "checkpoints" / str(trial_id)
            return local if local.is_dir() else Location(row["checkpoint"]).download(local)
        path = Path(row["checkpoint"])
        original = Path(self.summary.get("experiment", self.path))
        if not path.exists() and path.is_relative_to(original):
            path = self.path / path.relative_to(original)
        return path


def same_value(option, value) -> bool:
    """Whether `value`, read back from results.csv, is `option` of the space file: 9.0 is 9, "True" is true,
    a missing value is None."""
    if is_missing(value) or option is None:
        return is_missing(value) and option is None
    if isinstance(option, bool) or isinstance(value, (bool, np.bool_)):
        return str(option).lower() == str(value).lower()
    if isinstance(option, (int, float)):
        try:
            return float(value) == float(option)
        except (TypeError, ValueError):
            return False
    return str(option) == str(value)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _local_copy(source: Location) -> Path:
    """The result files of an experiment in object storage, copied to a folder on this machine."""
    if not (source / "results.csv").is_file():
        raise FileNotFoundError(f"{source}: no results.csv (not a finished ltsearch experiment)")
    folder = local_mirror(source, "experiments")
    for name in RESULT_FILES:
        if (source / name).is_file():
            (source / name).download(folder / name)
        else:
            (folder / name).unlink(missing_ok=True)  # left by an earlier copy
    return folder


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder written by `run_search.py`: a local path, or a URI (`s3://bucket/prefix/NAME`)."""
    source = Location(path) if is_uri(path) else None
    path = _local_copy(source) if source is not None else Path(path).expanduser()
    if not (path / "results.csv").is_file():
        raise FileNotFoundError(f"{path}: no results.csv (not a finished ltsearch experiment)")
    spec = yaml.safe_load((path / "space.yaml").read_text())
    space = {}
    for key, dist in spec["space"].items():
        kind = next(k for k in DISTRIBUTIONS if dist.get(k) is not None)
        space[key] = {"kind": kind, "args": dist[kind], **({"when": dist["when"]} if dist.get("when") else {})}
    search = spec.get("search", {})
    # Tune's hex ids can look like numbers ("1234e567")
    ids = {"trial_id": str, "stage1_trial": str, "confirmed_trial": str}
    try:
        results = pd.read_csv(path / "results.csv", dtype=ids)
    except pd.errors.EmptyDataError:  # no trial ran: the search wrote an empty table
        results = pd.DataFrame(columns=["trial_id", *space, "epochs", "objective", "status", "stop_reason"])
    history_file = path / "history.csv"
    if history_file.is_file() and history_file.stat().st_size > 1:  # no trial reported: an empty file
        history = pd.read_csv(history_file, dtype=ids)
    else:
        history = pd.DataFrame(columns=["trial_id", "epoch"])
    # a search with confirmation: its rows leave the trials' table, and joint mode's `phase: search` with them
    confirmation = pd.DataFrame()
    if "phase" in results:
        confirmation = results[results["phase"] == "confirm"].dropna(axis=1, how="all").reset_index(drop=True)
        results = results[results["phase"] != "confirm"].reset_index(drop=True)
        only = [c for c in results if c in CONFIRM_ONLY or c.startswith(("mean_", "std_"))]
        results = results.drop(columns=only)
        if set(results["phase"]) <= {"search"}:
            results = results.drop(columns="phase")
        if "phase" in history:
            history = history[history["phase"] != "confirm"].reset_index(drop=True)
            if set(history["phase"]) <= {"search"}:
                history = history.drop(columns="phase")
    confirm_file = path / "confirm.csv"
    confirm_runs = (pd.read_csv(confirm_file, dtype={**ids, "confirmed_trial": str})
                    if confirm_file.is_file() and confirm_file.stat().st_size > 1 else pd.DataFrame())
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    best_trial = summary.get("best", {}).get("trial_id")
    best_config_file = path / "best_config.yaml"
    results["outcome"] = _outcomes(results, best_trial)
    return Experiment(
        path=path, results=results, history=history, space=space,
        metrics=_as_list(search.get("metric", "val_acc")),
        directions=_as_list(search.get("direction", "max")),
        stage1_epochs=int(spec.get("base", {}).get("stage1", {}).get("epochs", 0)),
        best_trial=None if best_trial is None else str(best_trial),
        best_config=yaml.safe_load(best_config_file.read_text()) if best_config_file.is_file() else None,
        summary=summary, confirmation=confirmation, confirm_runs=confirm_runs,
        source=None if source is None else str(source), optuna_storage=search.get("optuna_storage"),
        base={f"{section}.{k}": v for section, values in (spec.get("base") or {}).items()
              if isinstance(values, dict) for k, v in values.items()})


def _outcomes(results: pd.DataFrame, best_trial: str | None) -> pd.Series:
    best, completed, stopped, error = OUTCOMES
    outcome = pd.Series(stopped, index=results.index)
    outcome[results["stop_reason"] == "completed"] = completed
    outcome[results["status"] == "ERROR"] = error
    outcome[results["trial_id"] == str(best_trial)] = best
    return outcome


def load_state(checkpoint: Path) -> dict:
    """The trainer's state in a checkpoint folder: best-by-validation metrics per stage, config, classes."""
    import torch  # deferred: ~1 s to import, and only a checkpoint needs it

    return torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def class_sizes(state: dict) -> tuple[list[int], list[str]]:
    """Training images per class and class names: stored in the checkpoint when the trainer put them
    there, else rebuilt from the trial's data config (never downloads; ~0.3 s for CIFAR-10)."""
    if "class_counts" in state:
        counts = state["class_counts"]
        return counts, state.get("class_names") or [str(c) for c in range(len(counts))]
    from ..build import load_data  # deferred: it imports torch

    config = with_overrides(ExperimentConfig.model_validate(state["config"]), {"data.download": False})
    data = load_data(config)
    return data.class_counts, list(data.class_names)
