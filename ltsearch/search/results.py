"""Result tables of a search: one row per trial (`results.csv`) and the best row (no Ray import).

A trial's results are one row per epoch with a monotonic global `epoch` and `total_epochs`, the epochs its
configuration plans (stage 1, plus stage 2 when enabled). Whether it completed, diverged, failed or was
stopped early is read from those rows, so a searched `stage1.epochs` is judged against its own schedule.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..config import ExperimentConfig
from ..metrics import is_missing
from ..selection import accuracy_interval, compare_with_best, metric_group, resolution_note
from ..space import SearchSettings

__all__ = [
    "ACCURACY_PREFIXES",
    "STAGE1_TRIAL",
    "VAL_CORRECT",
    "add_validation_noise",
    "best_row",
    "plain",
    "planned_epochs",
    "rank_trials",
    "sampled_values",
    "selection_rows",
    "stage_summary",
    "trial_row",
]

ACCURACY_PREFIXES = ("val_acc", "test_acc", "tau_val_acc", "tau_test_acc")
STAGE1_TRIAL = "stage1_trial"  # the stage-1 trial a staged search's stage-2 trial builds on
# A stage-2 row's per-image validation correctness (`selection.encode_correct`), taken out before results.csv
VAL_CORRECT = "val_correct"
TIE_COLUMNS = ("tied_with_best", "tie_test", "tied_unpaired", "only_best_right", "only_trial_right", "mcnemar_p")


def planned_epochs(config: ExperimentConfig) -> int:
    """Global epochs a joint trial of `config` runs when nothing stops it."""
    return config.stage1.epochs + (config.stage2.epochs if config.stage2.enabled else 0)


def trial_row(trial_id: str, values: dict, frame: pd.DataFrame | None, error: str | None,
              settings: SearchSettings, planned: int, pruner: str | None) -> dict[str, Any]:
    """One results.csv row: sampled values, final and best-by-validation metrics, status and why it stopped.

    `frame` holds the trial's results, one row per epoch in order; `planned` is its number of epochs when
    it runs to the end; `pruner` names what can stop it early (None: nothing can)."""
    row: dict[str, Any] = {"trial_id": trial_id, **values}
    epochs = 0
    if frame is not None and len(frame):
        last = frame.iloc[-1]
        epochs = int(last["epoch"])
        reported = [c for c in frame.columns if c.startswith(ACCURACY_PREFIXES) or c in settings.metrics]
        row.update({f"final_{c}": last[c] for c in reported})
        # The trainer's rule: the epoch with the best validation accuracy, the last one without a val set.
        has_val = "val_acc" in frame and frame["val_acc"].notna().any()
        best = frame.loc[frame["val_acc"].idxmax()] if has_val else last
        row["best_epoch"] = int(best["epoch"])
        row.update({f"best_{c}": best[c] for c in reported})
        # Lazy test evaluation (`trainer.test_every: rungs`): a best epoch evaluated without test gets the test
        # figures its stage's last epoch computed from its kept model and reported as `best_*` by `best_epoch`
        carried = frame[frame["best_epoch"] == best["epoch"]] if "best_epoch" in frame else frame.iloc[0:0]
        for c in reported:
            if c.startswith(("test_", "tau_test_")) and is_missing(row[f"best_{c}"]) and f"best_{c}" in carried:
                values = carried[f"best_{c}"].dropna()
                row[f"best_{c}"] = values.iloc[-1] if len(values) else row[f"best_{c}"]
    row["epochs"] = epochs
    row["objective"] = row.get(f"final_{settings.metrics[0]}")
    diverged = frame["diverged"].dropna() if frame is not None and "diverged" in frame else []
    if error is not None:
        row["status"], row["stop_reason"] = "ERROR", error
    elif len(diverged):
        row["status"], row["stop_reason"] = "TERMINATED", f"diverged: {diverged.iloc[-1]}"
    elif epochs >= planned:
        row["status"], row["stop_reason"] = "TERMINATED", "completed"
    elif pruner is not None:
        row["status"], row["stop_reason"] = "TERMINATED", f"stopped early by {pruner} at epoch {epochs}"
    else:
        row["status"], row["stop_reason"] = "TERMINATED", f"incomplete: {epochs} of {planned} epochs"
    return row


def rank_trials(table: pd.DataFrame, settings: SearchSettings, column_prefix: str = "final") -> pd.DataFrame:
    """Trials without an error and with a value of the first search metric, best first (ties: more epochs
    first, then by trial id, so that a resumed search ranks equal values as it did before). `column_prefix`
    chooses the value: `final` (the trial's last epoch) or `best` (its best-by-validation epoch, the one a
    stage-1 checkpoint hands to stage 2)."""
    column = f"{column_prefix}_{settings.metrics[0]}"
    if not len(table) or column not in table:
        return table.iloc[0:0]
    ok = table[table["status"] != "ERROR"].dropna(subset=[column])
    keys = [column, "epochs", *(["trial_id"] if "trial_id" in ok else [])]
    return ok.sort_values(keys, ascending=[settings.directions[0] == "min", False, True][:len(keys)])


def selection_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The search's trials that compete for its best configuration: staged mode's stage-2 trials, else
    every search trial (confirmation rows never: they summarise re-trainings of these)."""
    if "phase" not in table:
        return table
    if table["phase"].isin(("stage1", "stage2")).any():
        return table[table["phase"] == "stage2"]
    return table[table["phase"] != "confirm"]


def best_row(table: pd.DataFrame, settings: SearchSettings) -> pd.Series | None:
    """The trial with the best final objective (staged mode: among stage-2 trials)."""
    ranked = rank_trials(selection_rows(table), settings)
    return ranked.iloc[0] if len(ranked) else None


def _intervals(values: pd.Series, sizes: pd.Series) -> tuple[list[float], list[float]]:
    pairs = [accuracy_interval(v, n) if not (is_missing(v) or is_missing(n)) else (math.nan, math.nan)
             for v, n in zip(pd.to_numeric(values, errors="coerce"), sizes)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _objective_correct(record: dict | None, epoch: str, tau: bool, mask: np.ndarray | None) -> np.ndarray | None:
    """The per-image correctness behind an objective: of the `epoch` ("last" or "best") of a row's `record`
    ({"last": (2, images) bool, "best": ...}), the tau-normalised classifier's row or the plain one's, on the
    images of the objective's group (`mask`). None when the record lacks it."""
    correct = (record or {}).get(epoch)
    if correct is None:
        return None
    correct = np.asarray(correct)[1 if tau else 0]
    if mask is None:
        return correct
    return correct[mask] if len(mask) == len(correct) else None


def add_validation_noise(table: pd.DataFrame, settings: SearchSettings, images: pd.Series,
                         classes: int | None = None, correct: pd.Series | None = None,
                         val_groups: dict[str, np.ndarray] | None = None) -> tuple[pd.DataFrame, str | None]:
    """`table` with the validation set's noise on what selects (see `ltsearch.selection`), and the note to
    print when the validation set cannot resolve the top two trials (None otherwise).

    `images` holds per row a dict {"overall": validation images, "many": ..., "tail": ...}. `correct`, when
    the trials share one validation set, holds per row its per-image validation correctness
    ({"last": (2, images) bool for the epoch its final values come from, "best": for its best-by-validation
    epoch; rows: the classifier, its tau-normalised copy}) or None, and `val_groups` the images of each class
    group (a bool mask over the validation set) for a group objective. Columns added: `val_images` (the
    images behind the objective), `objective_lo` / `objective_hi` (its 95 % interval), `final_val_acc_lo` /
    `_hi`, `best_val_acc_lo` / `_hi`, and against the best trial of its phase on the value that phase is
    ranked by (the final objective; a staged search's stage-1 trials: the objective at their
    best-by-validation epoch, which chose the stage-2 parents): `tied_with_best` (McNemar's exact paired test
    where both have predictions, else Newcombe's unpaired interval), `tie_test` (which), `tied_unpaired`,
    `only_best_right` / `only_trial_right` and `mcnemar_p` (`selection.compare_with_best`). A metric that is
    no validation accuracy gets no interval and no ties."""
    table = table.copy()
    if not len(table):
        return table, None
    metric, direction = settings.metrics[0], settings.directions[0]
    group = metric_group(metric)
    overall = pd.Series([(i or {}).get("overall") for i in images], index=table.index, dtype="float")
    table["val_images"] = pd.Series([(i or {}).get(group) for i in images], index=table.index, dtype="float")
    table["objective_lo"], table["objective_hi"] = _intervals(table["objective"], table["val_images"])
    for column in ("final_val_acc", "best_val_acc"):
        if column in table:
            table[f"{column}_lo"], table[f"{column}_hi"] = _intervals(table[column], overall)
    empty = compare_with_best(pd.Series(math.nan, index=table.index), table["val_images"])
    for column in TIE_COLUMNS:
        table[column] = empty[column]
    if group is None:
        return table, None
    tau = metric.removeprefix("best_").removeprefix("final_").startswith("tau_")
    mask = None if group == "overall" else (val_groups or {}).get(group)
    phases = table["phase"] if "phase" in table else pd.Series("search", index=table.index)
    paired: dict = {}  # index -> the correctness behind the value its phase is ranked by, or None
    for phase in phases.unique():
        rows = table[(phases == phase) & (table["status"] != "ERROR")]
        column = f"best_{metric}" if phase == "stage1" and f"best_{metric}" in table else "objective"
        epoch = "best" if column.startswith("best_") else "last"
        for index in rows.index:
            record = None if correct is None else correct.get(index)
            paired[index] = None if group != "overall" and mask is None else _objective_correct(record, epoch, tau, mask)
        compared = compare_with_best(rows[column], rows["val_images"], direction, _series(paired, rows.index))
        for name in TIE_COLUMNS:
            table.loc[rows.index, name] = compared[name]
    final = selection_rows(table)
    final = final[final["status"] != "ERROR"]
    return table, resolution_note(final["objective"], final["val_images"], direction, classes,
                                  _series(paired, final.index))


def _series(values: dict, index: pd.Index) -> pd.Series:
    """Arrays (or None) by row, as an object Series (pandas would try to broadcast an array set in place)."""
    out = pd.Series(None, index=index, dtype=object)
    for key in index:
        out.at[key] = values.get(key)
    return out


GROUPS = ("head", "middle", "tail")  # size terciles of the training classes


def stage_summary(table: pd.DataFrame, settings: SearchSettings) -> list[str]:
    """Three lines for the end of a staged search: the best stage-1 model, the best final model (both chosen
    on validation) and their test accuracy overall and on the head, middle and tail thirds of the classes,
    then the change. The tau-normalised figures when the search selects on a `tau_*` metric (the model as
    deployed). Empty when there is no staged result to compare."""
    if "phase" not in table or not (table["phase"] == "stage1").any():
        return []
    stage1 = rank_trials(table[table["phase"] == "stage1"], settings, "best")
    final = best_row(table, settings)
    if not len(stage1) or final is None or final.get("phase") != "stage2":
        return []
    metric = settings.metrics[0]
    prefix = "tau_test_acc" if metric.startswith("tau_") else "test_acc"
    first = stage1.iloc[0]
    before = {g: first.get(f"best_{prefix}{s}") for g, s in [("all", ""), *((g, f"_{g}") for g in GROUPS)]}
    after = {g: final.get(f"final_{prefix}{s}") for g, s in [("all", ""), *((g, f"_{g}") for g in GROUPS)]}

    def pct(value) -> str:
        return "n/a" if is_missing(value) else f"{float(value):.1f}"

    def change(g: str) -> str:
        return "n/a" if is_missing(before[g]) or is_missing(after[g]) else f"{float(after[g]) - float(before[g]):+.1f}"

    def groups(values: dict) -> str:
        return ", ".join(f"{g} {pct(values[g])}" for g in GROUPS)

    first_line = (f"best stage-1 model  {first['trial_id']} (by {metric} at its best epoch): "
                  f"test {pct(before['all'])} % ({groups(before)})")
    final_line = (f"best final model    {final['trial_id']} (stage 2 on {final.get(STAGE1_TRIAL)}, by {metric}): "
                  f"test {pct(after['all'])} % ({groups(after)})")
    changes = ", ".join(f"{g} {change(g)}" for g in GROUPS)
    change_line = (f"what stage 2 changed, test points: overall {change('all')}, {changes} "
                   "(both chosen on validation; test only reported)")
    return [first_line, final_line, change_line]


def plain(value):
    """numpy scalars -> python, for YAML and JSON."""
    return value.item() if hasattr(value, "item") else value


def sampled_values(row: pd.Series, keys: list[str]) -> dict[str, Any]:
    """The sampled values of `keys` a results row holds (keys a `when` condition skipped are absent)."""
    return {k: plain(row[k]) for k in keys if k in row and not is_missing(row[k])}

