"""Result tables of a search: one row per trial (`results.csv`) and the best row (no Ray import).

A trial's results are one row per epoch with a monotonic global `epoch` and `total_epochs`, the epochs its
configuration plans (stage 1, plus stage 2 when enabled). Whether it completed, diverged, failed or was
stopped early is read from those rows, so a searched `stage1.epochs` is judged against its own schedule.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from ..config import ExperimentConfig
from ..metrics import is_missing
from ..space import SearchSettings

__all__ = [
    "ACCURACY_PREFIXES",
    "STAGE1_TRIAL",
    "best_row",
    "plain",
    "planned_epochs",
    "rank_trials",
    "sampled_values",
    "trial_row",
]

ACCURACY_PREFIXES = ("val_acc", "test_acc", "tau_val_acc", "tau_test_acc")
STAGE1_TRIAL = "stage1_trial"  # the stage-1 trial a staged search's stage-2 trial builds on


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
    first). `column_prefix` chooses the value: `final` (the trial's last epoch) or `best` (its
    best-by-validation epoch, the one a stage-1 checkpoint hands to stage 2)."""
    column = f"{column_prefix}_{settings.metrics[0]}"
    if not len(table) or column not in table:
        return table.iloc[0:0]
    ok = table[table["status"] != "ERROR"].dropna(subset=[column])
    return ok.sort_values([column, "epochs"], ascending=[settings.directions[0] == "min", False])


def best_row(table: pd.DataFrame, settings: SearchSettings) -> pd.Series | None:
    """The trial with the best final objective (staged mode: among stage-2 trials)."""
    if "phase" in table:
        table = table[table["phase"] == "stage2"]
    ranked = rank_trials(table, settings)
    return ranked.iloc[0] if len(ranked) else None


def plain(value):
    """numpy scalars -> python, for YAML and JSON."""
    return value.item() if hasattr(value, "item") else value


def sampled_values(row: pd.Series, keys: list[str]) -> dict[str, Any]:
    """The sampled values of `keys` a results row holds (keys a `when` condition skipped are absent)."""
    return {k: plain(row[k]) for k in keys if k in row and not is_missing(row[k])}

