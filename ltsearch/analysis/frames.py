"""Tidy pandas frames of an `Experiment`, one per question the report asks; no plotting here.

Accuracies are percentages of the TEST split by default (the search selected on validation; test is what
it reports). Groups a dataset does not have, such as few-shot classes in CIFAR-10-LT, are missing, never 0.
A trial's accuracy is that of its last epoch; where that epoch has no test figures (lazy test evaluation: a
trial ASHA stopped at an epoch that did not improve validation), that of its best-by-validation epoch, which
always has them (`plotted_accuracies`).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..selection import accuracy_interval, is_missing, metric_group
from .experiment import Experiment, class_sizes, load_state, same_value

__all__ = [
    "GROUPS", "NOT_SAMPLED", "accuracy_frame", "choice_labels", "confirmation_frame", "group_column", "importance_frame", "naive_baseline_trial",
    "pareto_frame", "per_class_frame", "plotted_accuracies", "progress_frame", "selection_frame", "survival_frame",
    "tail_pair", "top_trials",
]

GROUPS = ("overall", "many", "medium", "few", "head", "middle", "tail")
NOT_SAMPLED = "not sampled"  # a choice's label in a row whose `when` condition failed


def choice_labels(exp: Experiment, key: str, rows: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """A searched choice in `rows` as a categorical axis shows it: each row's sampled option, written as the
    space file writes it (results.csv gives 9 back as 9.0, None as a missing value), or NOT_SAMPLED where its
    `when` condition failed; and the axis's categories: exactly the options these rows sampled, in the space
    file's order (then NOT_SAMPLED when a row did not sample it), never an option no row sampled."""
    options = exp.space[key]["args"]

    def label(value) -> str:
        if is_missing(value) and None not in options:
            return NOT_SAMPLED  # a result from before the key was searched
        return next((str(o) for o in options if same_value(o, value)), str(value))

    took = exp.sampled(key, rows)
    labels = pd.Series([label(v) if t else NOT_SAMPLED for v, t in zip(rows[key], took)], index=rows.index,
                       dtype=object)
    present = set(labels)
    named = [str(o) for o in options]
    categories = [o for o in dict.fromkeys(named) if o in present]
    categories += sorted(present - set(named) - {NOT_SAMPLED}) + [NOT_SAMPLED] * (NOT_SAMPLED in present)
    return labels, categories


def group_column(split: str, group: str) -> str:
    """The results.csv column of a trial's final accuracy in a group: final_test_acc, final_test_acc_few."""
    return f"final_{split}_acc" + ("" if group == "overall" else f"_{group}")


def tail_pair(rows: pd.DataFrame, split: str) -> tuple[str, str]:
    """(many, few) when the dataset has both groups, else (head, tail): CIFAR-10-LT has no few-shot class."""
    columns = (group_column(split, "many"), group_column(split, "few"))
    both = all(c in rows and rows[c].notna().any() for c in columns)
    return ("many", "few") if both else ("head", "tail")


def plotted_accuracies(rows: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """`rows` (results.csv rows) with each trial's `final_{split}_acc*` as the figures plot them, and an
    `accuracy_at` column saying which epoch they come from: "last epoch", or "best-by-validation epoch"
    for a trial whose last epoch reported validation but no `split` figures. Under lazy test evaluation
    (`trainer.test_every: best`) that is a trial ASHA stopped at an epoch that neither improved validation
    nor ended a stage; its best-by-validation epoch (`best_{split}_acc*`) always has test figures. Nothing
    else is filled in: a group the dataset lacks and a diverged trial stay missing."""
    rows = rows.copy()
    overall = group_column(split, "overall")
    if overall not in rows:
        return rows
    reported = rows["final_val_acc"].notna() if "final_val_acc" in rows else pd.Series(False, index=rows.index)
    best_overall = "best_" + overall.removeprefix("final_")
    fill = rows[overall].isna() & reported & (rows[best_overall].notna() if best_overall in rows else False)
    for group in GROUPS:
        column = group_column(split, group)
        best = "best_" + column.removeprefix("final_")
        if column in rows and best in rows:
            rows.loc[fill, column] = rows.loc[fill, best]
    rows["accuracy_at"] = np.where(fill, "best-by-validation epoch",
                                   np.where(rows[overall].notna(), "last epoch", None))
    return rows


def accuracy_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """One row per trial and accuracy group (overall, many, ..., tail): its sampled values, outcome and
    `split` accuracy (%) as `plotted_accuracies` gives it, with `accuracy_at`. A group with no value (absent
    from the dataset) has no row."""
    results = plotted_accuracies(exp.results, split)
    columns = {group_column(split, g): g for g in GROUPS if group_column(split, g) in results}
    ids = ["trial_id", *[c for c in ("phase", "outcome", "accuracy_at") if c in results], *exp.space]
    frame = results.melt(id_vars=[c for c in ids if c in results], value_vars=list(columns),
                         var_name="group", value_name="accuracy")
    frame["group"] = frame["group"].map(columns)
    frame = frame.dropna(subset=["accuracy"]).reset_index(drop=True)
    images = exp.validation_images
    if split in ("val", "tau_val") and images:  # validation: each point with its 95 % interval from the set's size
        bounds = [accuracy_interval(a, images.get(g)) for a, g in zip(frame["accuracy"], frame["group"])]
        frame["accuracy_lo"], frame["accuracy_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return frame


def top_trials(exp: Experiment, n: int = 10, split: str = "test") -> pd.DataFrame:
    """The `n` best trials by the search objective (validation), with their test accuracies (as
    `plotted_accuracies` gives them)."""
    rows = plotted_accuracies(exp.final_rows(), split)
    keys = ["objective", *[c for c in ("epochs", "trial_id") if c in rows]]  # the search's ranking and tie-break
    rows = rows.sort_values(keys, ascending=[exp.directions[0] == "min", False, True][:len(keys)],
                            na_position="last")
    _, tail = tail_pair(rows, split)
    columns = ["trial_id", *[c for c in ("phase", "stage1_trial") if c in rows], *exp.space, "objective",
               "objective_lo", "objective_hi", "tied_with_best", "tied_unpaired", "final_val_acc", f"final_{split}_acc",
               group_column(split, tail), "accuracy_at", "epochs", "outcome"]
    if "accuracy_at" in rows and not (rows["accuracy_at"] == "best-by-validation epoch").any():
        columns.remove("accuracy_at")  # every test figure is the last epoch's, as the header says
    return rows[[c for c in dict.fromkeys(columns) if c in rows]].head(n).reset_index(drop=True)


def selection_frame(exp: Experiment, n: int = 30) -> pd.DataFrame:
    """The `n` best trials by the objective (validation), best first, with its 95 % interval (`lo`, `hi`),
    whether each is statistically tied with the best, and which trial the search and the confirmation
    picked (`search_pick`, `chosen`). Intervals are the search's (results.csv), else computed from the
    validation size in summary.json; without either they are missing."""
    rows = exp.final_rows().dropna(subset=["objective"])
    keys = ["objective", *[c for c in ("epochs", "trial_id") if c in rows]]  # the search's ranking and tie-break
    rows = rows.sort_values(keys, ascending=[exp.directions[0] == "min", False, True][:len(keys)]).head(n)
    frame = pd.DataFrame({"trial_id": rows["trial_id"], "rank": np.arange(1, len(rows) + 1),
                          "objective": rows["objective"], "outcome": rows["outcome"]})
    if "objective_lo" in rows:
        frame["lo"], frame["hi"] = rows["objective_lo"], rows["objective_hi"]
    else:
        n_images = exp.validation_images.get(metric_group(exp.objective) or "", None)
        bounds = [accuracy_interval(v, n_images) for v in rows["objective"]]
        frame["lo"], frame["hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    tied = rows["tied_with_best"] if "tied_with_best" in rows else pd.Series(pd.NA, index=rows.index)
    frame["tied_with_best"] = tied.map(lambda v: None if pd.isna(v) else str(v).lower() == "true")
    frame["search_pick"] = frame["trial_id"] == exp.search_pick
    frame["chosen"] = frame["trial_id"] == exp.best_trial
    return frame.reset_index(drop=True)


def confirmation_frame(exp: Experiment) -> pd.DataFrame:
    """One row per confirmed configuration and seed: the objective (validation) of that re-training, the
    configuration's mean and std over seeds and its single search run (`search_objective`), its rank by
    mean and whether it was chosen. Empty without a confirmation phase."""
    runs, summary = exp.confirm_runs, exp.confirmation
    if runs.empty or summary.empty:
        return pd.DataFrame(columns=["confirmed_trial", "seed", "objective", "mean_objective", "std_objective",
                                     "search_objective", "confirm_rank", "chosen"])
    keep = ["confirmed_trial", "mean_objective", "std_objective", "search_objective", "confirm_rank"]
    frame = runs[["confirmed_trial", "seed", "objective"]].merge(summary[keep], on="confirmed_trial")
    frame["chosen"] = frame["confirmed_trial"] == exp.best_trial
    return frame.sort_values(["confirm_rank", "seed"]).reset_index(drop=True)


def pareto_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """Per trial: head-side and tail-side accuracy (many/few, or head/tail) and whether it is on their
    Pareto front (no other trial at least as good on both and better on one)."""
    rows = plotted_accuracies(exp.final_rows(), split)
    head, tail = tail_pair(rows, split)
    frame = pd.DataFrame({"trial_id": rows["trial_id"], "outcome": rows["outcome"],
                          "head_group": head, "tail_group": tail,
                          "head_accuracy": rows[group_column(split, head)],
                          "tail_accuracy": rows[group_column(split, tail)]}).dropna()
    a, b = frame["head_accuracy"].to_numpy(), frame["tail_accuracy"].to_numpy()
    dominated = [((a >= a[i]) & (b >= b[i]) & ((a > a[i]) | (b > b[i]))).any() for i in range(len(frame))]
    return frame.assign(on_front=~np.array(dominated, dtype=bool)).reset_index(drop=True)


# ---------------------------------------------------------------------------- per class


def naive_baseline_trial(exp: Experiment) -> str | None:
    """The trial with the smallest stage-1 weight decay (0 included) among those that finished stage 1,
    when stage-1 weight decay was searched: the 'no weight balancing' reference."""
    if "stage1.weight_decay" not in exp.space:
        return None
    rows = exp.rows_sampling("stage1.weight_decay").dropna(subset=["stage1.weight_decay", "checkpoint"])
    finished = rows[rows["epochs"] >= exp.stage1_epochs]
    rows = finished if len(finished) else rows
    return None if rows.empty else str(rows.loc[rows["stage1.weight_decay"].idxmin(), "trial_id"])


def per_class_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """One row per model and class: `split` accuracy (%) and classifier weight norm against class size.

    Models, each at its best-by-validation epoch: the best trial after stage 1 and (when it ran) after
    stage 2, and the naive baseline's stage 1 (`naive_baseline_trial`) unless that is the same checkpoint
    (in a staged search the best trial's stage-1 parent can be the baseline).
    A staged search keeps no stage-2 model: its best trial shows its stage-1 parent only."""
    if exp.best_trial is None:
        raise ValueError(f"{exp.path}: summary.json names no best trial")
    models: list[tuple[str, str, dict, int]] = []
    baseline, best_checkpoint = naive_baseline_trial(exp), exp.checkpoint_dir(exp.best_trial)
    if baseline is not None and exp.checkpoint_dir(baseline) != best_checkpoint:
        wd = exp.results.set_index("trial_id").at[baseline, "stage1.weight_decay"]
        models.append((f"naive baseline (smallest stage-1 WD, {wd:.1e}): stage 1", baseline,
                       load_state(exp.checkpoint_dir(baseline)), 1))
    best_state = load_state(best_checkpoint)
    for stage in sorted(best_state["best"]):
        label = f"best trial: {'stage 1' if stage == 1 else 'after stage 2'}"
        models.append((label, exp.best_trial, best_state, stage))
    frames = []
    for label, trial_id, state, stage in models:
        metrics = state["best"][stage]["metrics"]
        counts, names = class_sizes(state)
        frames.append(pd.DataFrame({
            "model": label, "trial_id": trial_id, "stage": stage, "epoch": metrics["epoch"],
            "class_index": range(len(counts)), "class_name": names, "class_size": counts,
            "accuracy": pd.array(metrics[f"{split}_per_class_acc"], dtype="Float64").astype(float),
            "classifier_norm": metrics["classifier_norms"]}))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- the search itself


def progress_frame(exp: Experiment) -> pd.DataFrame:
    """Every reported epoch in time order, with cumulative training epochs (all trials), wall-clock seconds
    since the search started, the objective value and its best value so far (over every epoch any trial
    reported, as ASHA and Optuna saw them)."""
    metric = exp.objective
    frame = exp.history.dropna(subset=[metric]).sort_values(["timestamp", "time_total_s"], kind="stable")
    start = (frame["timestamp"] - frame["time_total_s"]).min()
    best_so_far = frame[metric].cummax() if exp.directions[0] == "max" else frame[metric].cummin()
    out = pd.DataFrame({
        "trial_id": frame["trial_id"], "epoch": frame["epoch"],
        "cumulative_epochs": np.arange(1, len(frame) + 1),
        "wall_time_s": frame["timestamp"] - start, "value": frame[metric], "best_so_far": best_so_far,
    }).reset_index(drop=True)
    n_images = exp.validation_images.get(metric_group(metric) or "")
    if n_images:  # the validation noise of the best value so far: a new best inside it may be luck
        bounds = [accuracy_interval(v, n_images) for v in out["best_so_far"]]
        out["best_so_far_lo"], out["best_so_far_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return out


def survival_frame(exp: Experiment) -> pd.DataFrame:
    """Trials still running at each epoch (ASHA rung survival), per phase in a staged search."""
    rows = exp.results.assign(phase=exp.results.get("phase", "search"))
    frames = []
    for phase, group in rows.groupby("phase", sort=False):
        epochs = np.arange(1, int(group["epochs"].max()) + 1)
        frames.append(pd.DataFrame({"phase": phase, "epoch": epochs,
                                    "trials": [(group["epochs"] >= e).sum() for e in epochs]}))
    return pd.concat(frames, ignore_index=True)


def importance_frame(exp: Experiment) -> pd.DataFrame:
    """Parameter importances of each Optuna study in optuna.db by Optuna's default evaluator (PED-ANOVA,
    as in optuna-dashboard; no scikit-learn): for the objective, or for reaching the Pareto front of a
    multi-objective study. ASHA-stopped trials count with the value they were stopped at.

    A study Optuna cannot evaluate (too few completed trials) gets one row with a `note` and no parameter."""
    import optuna  # deferred: ~0.5 s, only this frame needs it

    columns = ["study", "parameter", "importance", "note"]
    storage, prefix = exp.study_storage()
    if storage is None:
        return pd.DataFrame([{"study": "-", "note": f"no optuna.db in {exp.path}"}], columns=columns)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: list[dict[str, Any]] = []
    for summary in optuna.get_all_study_summaries(storage):
        if not summary.study_name.startswith(prefix):
            continue  # another experiment's study in a shared database
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        name = summary.study_name[len(prefix):] + (" (Pareto front)" if len(study.directions) > 1 else "")
        with warnings.catch_warnings(record=True) as caught:  # too few trials: a warning and equal values
            warnings.simplefilter("always")
            importances = optuna.importance.get_param_importances(study) if summary.n_trials else {}
        equal = [str(w.message) for w in caught if "will be equal" in str(w.message)]
        if equal or not importances:
            rows.append({"study": name, "note": f"{name}: {summary.n_trials} trial(s); "
                                                + (equal[0] if equal else "no completed trial")})
        else:
            rows += [{"study": name, "parameter": p, "importance": v} for p, v in importances.items()]
    return pd.DataFrame(rows, columns=columns)
