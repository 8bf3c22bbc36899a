"""Analysis of a finished search: tidy pandas frames and plotly figures of accuracy against regularisation.

    exp = load_experiment("runs/quickstart-20260101-120000")
    accuracy_frame(exp)                         # one row per trial and accuracy group
    for fig in accuracy_figures(exp).values():  # one figure per searched parameter
        fig.show()
    write_report("runs/quickstart-20260101-120000")   # report.html and figures/*.png

Reads only what `run_search.py` leaves in the experiment folder (results.csv, history.csv, space.yaml,
summary.json, best_config.yaml, optuna.db, the trials' checkpoints); never imports Ray. Accuracies are
percentages of the TEST split by default (the search selected on validation; test is what it reports).
Groups a dataset does not have, such as few-shot classes in CIFAR-10-LT, are missing, never plotted as 0.
In a staged search each parameter is plotted from the phase that sampled it.
"""
from __future__ import annotations

import html
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
import yaml
from plotly.subplots import make_subplots

from .space import DISTRIBUTIONS, STAGE2_PREFIXES

__all__ = [
    "Experiment", "accuracy_figure", "accuracy_figures", "accuracy_frame", "all_figures", "importance_figure",
    "importance_frame", "load_experiment", "naive_baseline_trial", "parallel_coordinates_figure",
    "pareto_figure", "pareto_frame", "per_class_figures", "per_class_frame", "progress_figure",
    "progress_frame", "survival_figure", "survival_frame", "top_trials", "write_report",
]

GROUPS = ("overall", "many", "medium", "few", "head", "middle", "tail")
SHOT_GROUPS = ("overall", "many", "medium", "few")  # the first row of an accuracy figure; terciles below
GROUP_NAMES = {"overall": "all classes", "many": "many-shot", "medium": "medium-shot", "few": "few-shot",
               "head": "head third", "middle": "middle third", "tail": "tail third"}
GROUP_PANELS = {**GROUP_NAMES, "many": "many-shot (>100 train images)", "medium": "medium-shot (20-100)",
                "few": "few-shot (<20)", "head": "head third of classes"}
KEY_NAMES = {
    "stage1.weight_decay": "stage-1 weight decay",
    "stage2.weight_decay": "stage-2 weight decay",
    "stage2.maxnorm_thresh": "MaxNorm threshold",
    "stage2.beta": "class-balanced loss beta",
    "posthoc.tau": "tau",
    "model.nbn": "normalized BN",
}
KEY_UNITS = {"stage2.maxnorm_thresh": "fraction of the stage-1 norm range",
             "posthoc.tau": "exponent of the post-hoc norm division"}
OUTCOME_SYMBOLS = {"best by validation": "star", "completed": "circle", "stopped early (ASHA)": "circle-open",
                   "error": "x"}
NBN_COLOURS = {"NBN off": "#4C78A8", "NBN on": "#F58518"}
FONT_SIZE = 14
WIDE, TALL = 1200, 720


@dataclass
class Experiment:
    """One experiment folder, read. `results` gains an `outcome` column (see OUTCOME_SYMBOLS)."""

    path: Path
    results: pd.DataFrame  # one row per trial
    history: pd.DataFrame  # one row per trial and reported epoch
    space: dict[str, dict]  # searched key -> {"kind": "loguniform", "args": [1e-4, 1e-1]}
    metrics: list[str]  # the search's objective(s), the first one drives ASHA and the best trial
    directions: list[str]
    stage1_epochs: int
    best_trial: str | None
    best_config: dict | None
    summary: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def objective(self) -> str:
        return self.metrics[0]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder written by `run_search.py`."""
    path = Path(path).expanduser()
    if not (path / "results.csv").is_file():
        raise FileNotFoundError(f"{path}: no results.csv (not a finished ltsearch experiment)")
    spec = yaml.safe_load((path / "space.yaml").read_text())
    space = {}
    for key, dist in spec["space"].items():
        kind = next(k for k in DISTRIBUTIONS if dist.get(k) is not None)
        space[key] = {"kind": kind, "args": dist[kind]}
    search = spec.get("search", {})
    ids = {"trial_id": str, "stage1_trial": str}  # Tune's hex ids can look like numbers ("1234e567")
    results = pd.read_csv(path / "results.csv", dtype=ids)
    history_file = path / "history.csv"
    if history_file.is_file() and history_file.stat().st_size > 1:  # no trial reported: an empty file
        history = pd.read_csv(history_file, dtype=ids)
    else:
        history = pd.DataFrame(columns=["trial_id", "epoch"])
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
        summary=summary)


def _outcomes(results: pd.DataFrame, best_trial: str | None) -> pd.Series:
    outcome = pd.Series("stopped early (ASHA)", index=results.index)
    outcome[results["stop_reason"] == "completed"] = "completed"
    outcome[results["status"] == "ERROR"] = "error"
    outcome[results["trial_id"] == str(best_trial)] = "best by validation"
    return outcome


# ---------------------------------------------------------------------------- labels and styling


def _is_log(exp: Experiment, key: str, values: pd.Series) -> bool:
    """Log axis for loguniform keys, and for weight decays that were sampled without 0."""
    kind = exp.space[key]["kind"]
    if kind == "choice":
        return False
    return kind == "loguniform" or (key.endswith("weight_decay") and bool((values > 0).all()))


def _key_name(key: str) -> str:
    return KEY_NAMES.get(key, key)


def _key_axis(exp: Experiment, key: str, values: pd.Series, pad: float = 0.04) -> dict:
    """Axis settings for a searched key: title with unit, log type and 1-2-5 ticks for log keys, and the
    searched range (widened by `pad` of itself), so that one sees where in the space the trials landed."""
    details = [d for d in (KEY_UNITS.get(key), "log axis" if _is_log(exp, key, values) else None) if d]
    axis: dict[str, Any] = {"title_text": _key_name(key) + (f" ({', '.join(details)})" if details else "")}
    dist = exp.space[key]
    if dist["kind"] == "choice":
        return axis
    low, high = dist["args"][:2]
    if _is_log(exp, key, values):
        low, high = (low, high) if dist["kind"] == "loguniform" else (values.min(), values.max())
        ticks = _log_ticks(low, high)
        margin = pad * math.log10(high / low)
        return {**axis, "type": "log", "range": [math.log10(low) - margin, math.log10(high) + margin],
                "tickvals": ticks, "ticktext": [_tick_text(t) for t in ticks]}
    margin = pad * (high - low)
    return {**axis, "range": [low - margin, high + margin]}


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks over up to two decades, 1-3 up to four, powers of ten beyond."""
    decades = math.log10(high / low)
    mantissas = (1, 2, 5) if decades <= 2 else (1, 3) if decades <= 4 else (1,)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in mantissas]
    return [t for t in ticks if low / 1.05 <= t <= high * 1.05] or [low, high]


def _tick_text(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e") if value < 0.01 else f"{value:g}"


def _metric_label(name: str) -> str:
    """`val_acc_few` -> 'validation few-shot accuracy (%)'; other names are kept as they are."""
    match = re.fullmatch(r"(best_)?(tau_)?(val|test|train)_acc(?:_(\w+))?", name)
    if not match:
        return name
    _, tau, split, group = match.groups()
    split = {"val": "validation", "test": "test", "train": "training"}[split]
    group = f"{GROUP_NAMES[group]} " if group in GROUP_NAMES else ""
    return f"{split} {group}accuracy{', tau-normalised' if tau else ''} (%)"


def _style(fig: go.Figure, title: str, width: int = WIDE, height: int = 560) -> go.Figure:
    fig.update_layout(template="plotly_white", title={"text": title, "font": {"size": FONT_SIZE + 6}},
                      font={"size": FONT_SIZE}, width=width, height=height,
                      legend={"font": {"size": FONT_SIZE}}, margin={"t": 90})
    return fig


def _rows_for(exp: Experiment, key: str) -> pd.DataFrame:
    """The trials that sampled `key`: in a staged search, stage-2 keys come from the stage-2 phase."""
    rows = exp.results
    if "phase" in rows:
        rows = rows[rows["phase"] == ("stage2" if key.startswith(STAGE2_PREFIXES) else "stage1")]
    return rows


def _final_rows(exp: Experiment) -> pd.DataFrame:
    """The trials the search ranks for its best configuration (staged: the stage-2 phase)."""
    rows = exp.results
    return rows[rows["phase"] == "stage2"] if "phase" in rows else rows


def _group_column(split: str, group: str) -> str:
    """The results.csv column of a trial's final accuracy in a group: final_test_acc, final_test_acc_few."""
    return f"final_{split}_acc" + ("" if group == "overall" else f"_{group}")


# ---------------------------------------------------------------------------- accuracy vs regularisation


def accuracy_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """One row per trial and accuracy group (overall, many, ..., tail): its sampled values, outcome and
    final `split` accuracy (%). A group with no value (absent from the dataset) has no row."""
    columns = {_group_column(split, g): g for g in GROUPS if _group_column(split, g) in exp.results}
    ids = ["trial_id", *[c for c in ("phase", "outcome") if c in exp.results], *exp.space]
    frame = exp.results.melt(id_vars=[c for c in ids if c in exp.results], value_vars=list(columns),
                             var_name="group", value_name="accuracy")
    frame["group"] = frame["group"].map(columns)
    return frame.dropna(subset=["accuracy"]).reset_index(drop=True)


def accuracy_figure(exp: Experiment, key: str, split: str = "test") -> go.Figure:
    """Accuracy of every trial against one searched parameter, one panel per accuracy group (overall and
    shot groups in the first row, size terciles in the second); coloured by NBN on/off when `model.nbn`
    was searched; the best trial (by validation) is a star, ASHA-stopped trials are open circles.
    Against tau, the accuracy is the tau-normalised classifier's (`final_tau_*`): tau changes nothing else."""
    tau = key == "posthoc.tau" and _group_column(f"tau_{split}", "overall") in exp.results
    measured = f"tau_{split}" if tau else split
    frame = accuracy_frame(exp, measured)
    frame = frame[frame["trial_id"].isin(_rows_for(exp, key)["trial_id"])].dropna(subset=[key])
    present = [g for g in GROUPS if g in set(frame["group"])]
    shot = [g for g in present if g in SHOT_GROUPS]
    orders = {"outcome": list(OUTCOME_SYMBOLS), "group": [GROUP_PANELS[g] for g in present]}
    if exp.space[key]["kind"] == "choice":  # categorical axis, options in the order of the space file
        frame[key] = frame[key].astype(str)
        orders[key] = [str(v) for v in exp.space[key]["args"]]
    frame["group"] = frame["group"].map(GROUP_PANELS)
    colour = None
    if "model.nbn" in exp.space and key != "model.nbn":
        colour = "NBN"
        frame[colour] = np.where(frame["model.nbn"].astype(str).str.lower() == "true", "NBN on", "NBN off")
    wrap = max(len(shot), len(present) - len(shot))
    fig = px.scatter(frame, x=key, y="accuracy", facet_col="group", color=colour,
                     facet_col_wrap=wrap, facet_row_spacing=0.16,
                     symbol="outcome", symbol_map=OUTCOME_SYMBOLS, color_discrete_map=NBN_COLOURS,
                     category_orders=orders, hover_data=["trial_id"],
                     labels={"accuracy": _metric_label(f"{measured}_acc"), "outcome": "trial"})
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_traces(marker={"size": 11})
    fig.update_traces(marker={"size": 18}, selector=lambda t: "best" in (t.name or ""))
    axis = _key_axis(exp, key, frame[key])
    fig.update_xaxes(showticklabels=True, **{**axis, "title_text": None})
    # an explicit x range on matched log axes breaks plotly.js's shared y autorange: set y from the data
    low, high = frame["accuracy"].min(), frame["accuracy"].max()
    pad = 0.08 * max(high - low, 10.0)
    fig.update_yaxes(range=[max(low - pad, -3), min(high + pad, 103)])
    fig.add_annotation(text=axis["title_text"], xref="paper", yref="paper", x=0.5, y=0, yanchor="top",
                       yshift=-40, showarrow=False, font={"size": FONT_SIZE + 2})
    what = f"{split.capitalize()} accuracy{' (tau-normalised classifier)' if tau else ''}"
    return _style(fig, f"{what} vs {_key_name(key)} ({exp.name})",
                  height=TALL if len(present) > wrap else 460)


def accuracy_figures(exp: Experiment, split: str = "test") -> dict[str, go.Figure]:
    """`accuracy_figure` for every searched parameter, named `accuracy_vs_<key>`."""
    return {f"accuracy_vs_{key.replace('.', '_')}": accuracy_figure(exp, key, split) for key in exp.space
            if _rows_for(exp, key)[key].notna().any()}


# ---------------------------------------------------------------------------- per class


def naive_baseline_trial(exp: Experiment) -> str | None:
    """The trial with the smallest stage-1 weight decay (0 included) among those that finished stage 1,
    when stage-1 weight decay was searched: the 'no weight balancing' reference."""
    if "stage1.weight_decay" not in exp.space:
        return None
    rows = _rows_for(exp, "stage1.weight_decay").dropna(subset=["stage1.weight_decay", "checkpoint"])
    finished = rows[rows["epochs"] >= exp.stage1_epochs]
    rows = finished if len(finished) else rows
    return None if rows.empty else str(rows.loc[rows["stage1.weight_decay"].idxmin(), "trial_id"])


def _checkpoint_dir(exp: Experiment, trial_id: str) -> Path:
    """The trial's last checkpoint; a staged stage-2 trial (no checkpoint of its own) gives its stage-1
    parent's. A folder moved since the search is found under its new location."""
    row = exp.results.set_index("trial_id").loc[trial_id]
    if _missing(row.get("checkpoint")) and not _missing(row.get("stage1_trial")):
        return _checkpoint_dir(exp, row["stage1_trial"])
    if _missing(row.get("checkpoint")):
        raise FileNotFoundError(f"trial {trial_id} has no checkpoint in {exp.path / 'results.csv'}")
    path = Path(row["checkpoint"])
    original = Path(exp.summary.get("experiment", exp.path))
    if not path.exists() and path.is_relative_to(original):
        path = exp.path / path.relative_to(original)
    return path


def _load_state(checkpoint: Path) -> dict:
    import torch  # deferred: only per-class figures read checkpoints

    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)


def _class_sizes(state: dict) -> tuple[list[int], list[str]]:
    """Training images per class and class names: stored in the checkpoint when the trainer put them
    there, else rebuilt from the trial's data config (never downloads; ~0.3 s for CIFAR-10)."""
    if "class_counts" in state:
        counts = state["class_counts"]
        return counts, state.get("class_names") or [str(c) for c in range(len(counts))]
    from .config import ExperimentConfig, with_overrides
    from .data import load_data

    config = with_overrides(ExperimentConfig.model_validate(state["config"]), {"data.download": False})
    data = load_data(config)
    return data.class_counts, list(data.class_names)


def per_class_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """One row per model and class: `split` accuracy (%) and classifier weight norm against class size.

    Models, each at its best-by-validation epoch: the best trial after stage 1 and (when it ran) after
    stage 2, and the naive baseline's stage 1 (`naive_baseline_trial`) unless that is the same checkpoint
    (in a staged search the best trial's stage-1 parent can be the baseline).
    A staged search keeps no stage-2 model: its best trial shows its stage-1 parent only."""
    if exp.best_trial is None:
        raise ValueError(f"{exp.path}: summary.json names no best trial")
    models: list[tuple[str, str, dict, int]] = []
    baseline, best_checkpoint = naive_baseline_trial(exp), _checkpoint_dir(exp, exp.best_trial)
    if baseline is not None and _checkpoint_dir(exp, baseline) != best_checkpoint:
        wd = exp.results.set_index("trial_id").at[baseline, "stage1.weight_decay"]
        models.append((f"naive baseline (smallest stage-1 WD, {wd:.1e}): stage 1", baseline,
                       _load_state(_checkpoint_dir(exp, baseline)), 1))
    best_state = _load_state(best_checkpoint)
    for stage in sorted(best_state["best"]):
        label = f"best trial: {'stage 1' if stage == 1 else 'after stage 2'}"
        models.append((label, exp.best_trial, best_state, stage))
    frames = []
    for label, trial_id, state, stage in models:
        metrics = state["best"][stage]["metrics"]
        counts, names = _class_sizes(state)
        frames.append(pd.DataFrame({
            "model": label, "trial_id": trial_id, "stage": stage, "epoch": metrics["epoch"],
            "class_index": range(len(counts)), "class_name": names, "class_size": counts,
            "accuracy": pd.array(metrics[f"{split}_per_class_acc"], dtype="Float64").astype(float),
            "classifier_norm": metrics["classifier_norms"]}))
    return pd.concat(frames, ignore_index=True)


def per_class_figures(exp: Experiment, split: str = "test") -> dict[str, go.Figure]:
    """Per-class accuracy and per-class classifier weight norm against class size (log axis)."""
    frame = per_class_frame(exp, split)
    labels = {"class_size": "training images in the class (log axis)", "model": "model",
              "accuracy": f"per-class {split} accuracy (%)",
              "classifier_norm": "classifier weight norm ||w_c|| (L2)"}
    models = list(dict.fromkeys(frame["model"]))  # baseline, best stage 1, best after stage 2
    colours = {m: "#9E9E9E" if m.startswith("naive") else "#E45756" if "stage 2" in m else "#4C78A8"
               for m in models}
    common = {"x": "class_size", "color": "model", "markers": True, "log_x": True, "labels": labels,
              "hover_data": ["class_name", "trial_id"], "category_orders": {"model": models},
              "color_discrete_map": colours}
    frame = frame.sort_values("class_size", kind="stable")  # lines run along the x axis
    accuracy = px.line(frame, y="accuracy", **common)
    accuracy.update_yaxes(range=[-3, 103])
    norms = px.line(frame, y="classifier_norm", **common)
    ticks = _log_ticks(frame["class_size"].min(), frame["class_size"].max())
    for fig in (accuracy, norms):
        fig.update_xaxes(tickvals=ticks, ticktext=[_tick_text(t) for t in ticks])
        fig.update_traces(marker={"size": 9}, line={"width": 2.5})
        fig.update_layout(legend={"orientation": "h", "y": -0.2, "x": 0, "title": None})
    return {
        "per_class_accuracy": _style(accuracy, f"Per-class {split} accuracy against class size ({exp.name})"),
        "classifier_norms": _style(norms,
                                   f"Per-class classifier weight norms against class size ({exp.name})"),
    }


# ---------------------------------------------------------------------------- search progress


def progress_frame(exp: Experiment) -> pd.DataFrame:
    """Every reported epoch in time order, with cumulative training epochs (all trials), wall-clock seconds
    since the search started, the objective value and its best value so far (over every epoch any trial
    reported, as ASHA and Optuna saw them)."""
    metric = exp.objective
    frame = exp.history.dropna(subset=[metric]).sort_values(["timestamp", "time_total_s"], kind="stable")
    start = (frame["timestamp"] - frame["time_total_s"]).min()
    best_so_far = frame[metric].cummax() if exp.directions[0] == "max" else frame[metric].cummin()
    return pd.DataFrame({
        "trial_id": frame["trial_id"], "epoch": frame["epoch"],
        "cumulative_epochs": np.arange(1, len(frame) + 1),
        "wall_time_s": frame["timestamp"] - start, "value": frame[metric], "best_so_far": best_so_far,
    }).reset_index(drop=True)


def progress_figure(exp: Experiment) -> go.Figure:
    """Best-so-far objective against cumulative epochs and against wall-clock time."""
    frame = progress_frame(exp)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("against training epochs", "against wall-clock time"))
    for col, x in ((1, "cumulative_epochs"), (2, "wall_time_s")):
        fig.add_trace(go.Scatter(x=frame[x], y=frame["value"], mode="markers", name="reported by a trial",
                                 marker={"color": "#9E9E9E", "size": 8}, customdata=frame["trial_id"],
                                 hovertemplate="trial %{customdata}<br>%{y:.2f}<extra></extra>",
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=frame[x], y=frame["best_so_far"], mode="lines", line_shape="hv",
                                 name="best so far", line={"color": "#E45756", "width": 3},
                                 showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(rangemode="tozero")
    fig.update_xaxes(title_text="cumulative training epochs (all trials)", row=1, col=1)
    fig.update_xaxes(title_text="wall-clock time since the search started (s)", row=1, col=2)
    fig.update_yaxes(title_text=_metric_label(exp.objective), row=1, col=1)
    objective = _metric_label(exp.objective).split(" (")[0]
    return _style(fig, f"Search progress: best {objective} so far ({exp.name})")


def survival_frame(exp: Experiment) -> pd.DataFrame:
    """Trials still running at each epoch (ASHA rung survival), per phase in a staged search."""
    rows = exp.results.assign(phase=exp.results.get("phase", "search"))
    frames = []
    for phase, group in rows.groupby("phase", sort=False):
        epochs = np.arange(1, int(group["epochs"].max()) + 1)
        frames.append(pd.DataFrame({"phase": phase, "epoch": epochs,
                                    "trials": [(group["epochs"] >= e).sum() for e in epochs]}))
    return pd.concat(frames, ignore_index=True)


def survival_figure(exp: Experiment) -> go.Figure:
    frame = survival_frame(exp)
    staged = frame["phase"].nunique() > 1
    fig = px.bar(frame, x="epoch", y="trials", text="trials", color="phase" if staged else None,
                 barmode="group", labels={"epoch": "epoch", "trials": "trials still running"})
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(rangemode="tozero")
    return _style(fig, f"ASHA rung survival: trials still running at each epoch ({exp.name})", width=900,
                  height=480)


def parallel_coordinates_figure(exp: Experiment, split: str = "test") -> go.Figure:
    """Every trial as a line through its sampled values (log keys on log-spaced axes), the objective and
    the final test accuracy; coloured by the objective."""
    rows = _final_rows(exp).dropna(subset=["objective"])
    dimensions = []
    for key, dist in exp.space.items():
        values = rows[key]
        if dist["kind"] == "choice":
            options = [str(v) for v in dist["args"]]
            codes = values.astype(str).map({o: i for i, o in enumerate(options)})
            dimensions.append({"label": _key_name(key), "values": codes,
                               "tickvals": list(range(len(options))), "ticktext": options})
        elif _is_log(exp, key, values.dropna()):
            axis = _key_axis(exp, key, values.dropna(), pad=0)
            dimensions.append({"label": f"{_key_name(key)} (log)", "values": np.log10(values),
                               "range": axis["range"], "tickvals": np.log10(axis["tickvals"]),
                               "ticktext": axis["ticktext"]})
        else:
            dimensions.append({"label": _key_name(key), "values": values, "tickformat": ".3~g",
                               "range": _key_axis(exp, key, values.dropna(), pad=0)["range"]})
    objective = _metric_label(exp.objective)
    dimensions.append({"label": objective, "values": rows["objective"], "tickformat": ".3~g"})
    if f"final_{split}_acc" in rows:
        dimensions.append({"label": f"{split} accuracy (%)", "values": rows[f"final_{split}_acc"],
                           "tickformat": ".3~g"})
    fig = go.Figure(go.Parcoords(
        dimensions=dimensions, labelfont={"size": FONT_SIZE}, tickfont={"size": FONT_SIZE - 2},
        line={"color": rows["objective"], "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": objective.replace(" (%)", "<br>(%)")}}}))
    fig = _style(fig, f"All trials: sampled values and objective ({exp.name})", height=560)
    fig.update_layout(margin={"l": 110, "r": 40, "t": 140})
    return fig


def importance_frame(exp: Experiment) -> pd.DataFrame:
    """Parameter importances of each Optuna study in optuna.db by Optuna's default evaluator (PED-ANOVA,
    as in optuna-dashboard; no scikit-learn): for the objective, or for reaching the Pareto front of a
    multi-objective study. ASHA-stopped trials count with the value they were stopped at.

    A study Optuna cannot evaluate (too few completed trials) gets one row with a `note` and no parameter."""
    import optuna  # deferred: ~0.5 s, only this figure needs it

    columns = ["study", "parameter", "importance", "note"]
    if not (exp.path / "optuna.db").is_file():
        return pd.DataFrame([{"study": "-", "note": f"no optuna.db in {exp.path}"}], columns=columns)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{exp.path / 'optuna.db'}"
    rows: list[dict[str, Any]] = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        name = summary.study_name + (" (Pareto front)" if len(study.directions) > 1 else "")
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


def importance_figure(exp: Experiment) -> go.Figure:
    frame = importance_frame(exp)
    bars = frame.dropna(subset=["parameter"]).sort_values("importance")
    fig = px.bar(bars, x="importance", y="parameter", color="study", orientation="h", barmode="group",
                 labels={"importance": "PED-ANOVA importance (normalised to sum to 1)",
                         "parameter": "parameter"})
    fig.update_xaxes(range=[0, 1])
    fig.update_layout(showlegend=bars["study"].nunique() > 1)
    notes = frame["note"].dropna().tolist()
    if notes:
        fig.add_annotation(text="Not evaluated: " + "<br>".join(notes), xref="paper", yref="paper", x=0.5,
                           y=0.5 if bars.empty else -0.35, showarrow=False, font={"size": FONT_SIZE})
    return _style(fig, f"Parameter importances for the objective ({exp.name})", width=1000,
                  height=max(420, 120 + 45 * len(bars)))


def _tail_pair(rows: pd.DataFrame, split: str) -> tuple[str, str]:
    """(many, few) when the dataset has both groups, else (head, tail): CIFAR-10-LT has no few-shot class."""
    columns = (_group_column(split, "many"), _group_column(split, "few"))
    both = all(c in rows and rows[c].notna().any() for c in columns)
    return ("many", "few") if both else ("head", "tail")


def pareto_frame(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """Per trial: head-side and tail-side accuracy (many/few, or head/tail) and whether it is on their
    Pareto front (no other trial at least as good on both and better on one)."""
    rows = _final_rows(exp)
    head, tail = _tail_pair(rows, split)
    frame = pd.DataFrame({"trial_id": rows["trial_id"], "outcome": rows["outcome"],
                          "head_group": head, "tail_group": tail,
                          "head_accuracy": rows[_group_column(split, head)],
                          "tail_accuracy": rows[_group_column(split, tail)]}).dropna()
    a, b = frame["head_accuracy"].to_numpy(), frame["tail_accuracy"].to_numpy()
    dominated = [((a >= a[i]) & (b >= b[i]) & ((a > a[i]) | (b > b[i]))).any() for i in range(len(frame))]
    return frame.assign(on_front=~np.array(dominated, dtype=bool)).reset_index(drop=True)


def pareto_figure(exp: Experiment, split: str = "test") -> go.Figure:
    frame = pareto_frame(exp, split)
    head, tail = frame["head_group"].iat[0], frame["tail_group"].iat[0]
    x_label, y_label = (f"{split} {GROUP_NAMES[g]} accuracy (%)" for g in (head, tail))
    fig = px.scatter(frame, x="head_accuracy", y="tail_accuracy", symbol="outcome",
                     symbol_map=OUTCOME_SYMBOLS, category_orders={"outcome": list(OUTCOME_SYMBOLS)},
                     hover_data=["trial_id"],
                     labels={"head_accuracy": x_label, "tail_accuracy": y_label, "outcome": "trial"})
    fig.update_traces(marker={"size": 12, "color": "#4C78A8"})
    fig.update_yaxes(range=[-3, max(frame["tail_accuracy"].max() * 1.1, 10)])  # all-zero tails stay readable
    fig.update_traces(marker={"size": 18}, selector=lambda t: "best" in (t.name or ""))
    front = frame[frame["on_front"]].sort_values("head_accuracy")
    fig.add_trace(go.Scatter(x=front["head_accuracy"], y=front["tail_accuracy"], mode="lines",
                             name="Pareto front", line={"color": "#E45756", "width": 2, "dash": "dash"}))
    title = f"{head.capitalize()} vs {tail} {split} accuracy: the trade-off and its Pareto front ({exp.name})"
    return _style(fig, title, width=900, height=600)


def top_trials(exp: Experiment, n: int = 10, split: str = "test") -> pd.DataFrame:
    """The `n` best trials by the search objective (validation), with their test accuracies."""
    rows = _final_rows(exp)
    rows = rows.sort_values("objective", ascending=exp.directions[0] == "min", na_position="last")
    _, tail = _tail_pair(rows, split)
    columns = ["trial_id", *[c for c in ("phase", "stage1_trial") if c in rows], *exp.space, "objective",
               "final_val_acc", f"final_{split}_acc", _group_column(split, tail), "epochs", "outcome"]
    return rows[[c for c in dict.fromkeys(columns) if c in rows]].head(n).reset_index(drop=True)


# ---------------------------------------------------------------------------- report


def all_figures(exp: Experiment, split: str = "test") -> dict[str, go.Figure]:
    """Every figure of the report, by file name stem. The per-class figures are left out, with a printed
    line, when the folder lacks what they need (pruned checkpoints, data no longer at its path)."""
    figures = accuracy_figures(exp, split)
    try:
        figures.update(per_class_figures(exp, split))
    except (OSError, ValueError, KeyError) as err:
        print(f"per-class figures skipped: {err}")
    figures.update(search_progress=progress_figure(exp), asha_survival=survival_figure(exp),
                   parallel_coordinates=parallel_coordinates_figure(exp, split),
                   param_importances=importance_figure(exp), pareto=pareto_figure(exp, split))
    return figures


def _table_html(exp: Experiment, table: pd.DataFrame) -> str:
    formatted = table.copy()
    for column in formatted.columns:
        if column in exp.space and exp.space[column]["kind"] == "loguniform":
            formatted[column] = formatted[column].map(lambda v: "" if _missing(v) else f"{v:.2e}")
        elif pd.api.types.is_float_dtype(formatted[column]):  # accuracies keep 2 decimals: 28.49 vs 28.47
            digits = 3 if column in exp.space else 4
            formatted[column] = formatted[column].map(lambda v, d=digits: "" if _missing(v) else f"{v:.{d}g}")
    labels = {"objective": f"objective: {exp.objective}"}
    return formatted.rename(columns=labels).to_html(index=False, border=0, classes="trials")


def write_report(path: str | Path, png: bool = True) -> Path:
    """Write `path/report.html` (self-contained: plotly.js embedded once) and, when kaleido finds a Chromium,
    `path/figures/*.png`. Returns the report's path."""
    exp = load_experiment(path)
    figures = all_figures(exp)
    titles = {name: fig.layout.title.text for name, fig in figures.items()}
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=i == 0, div_id=name,
                          config={"displaylogo": False})
        parts.append(f'<section id="{name}-section">{div}</section>')
    summary = exp.summary
    contents = "".join(f'<li><a href="#{n}-section">{html.escape(t)}</a></li>' for n, t in titles.items())
    best_config = yaml.safe_dump(exp.best_config, sort_keys=False) if exp.best_config else "(no best trial)"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ltsearch report: {html.escape(exp.name)}</title>
<style>body{{font-family:sans-serif;font-size:15px;max-width:1260px;margin:auto;padding:1em}}
table.trials{{border-collapse:collapse}} table.trials td, table.trials th{{padding:4px 10px;text-align:right;
border-bottom:1px solid #ddd}} pre{{background:#f6f6f6;padding:1em}} section{{margin:2em 0}}</style></head>
<body><h1>ltsearch report: {html.escape(exp.name)}</h1>
<p>{len(exp.results)} trials in {html.escape(str(exp.path))}; objective {html.escape(", ".join(exp.metrics))}
({html.escape(", ".join(exp.directions))}), selected on validation; test accuracy is reported, never used to
select. Search wall time: {summary.get("wall_time_s", float("nan")):.0f} s.</p>
<h2>Top trials by the search objective</h2>
{_table_html(exp, top_trials(exp))}
<h2>Best configuration (trial {html.escape(str(exp.best_trial))})</h2>
<pre>{html.escape(best_config)}</pre>
<h2>Figures</h2><ul>{contents}</ul>
{"".join(parts)}
</body></html>
"""
    report = exp.path / "report.html"
    report.write_text(page)
    print(f"wrote {report}")
    if png:
        _write_pngs(figures, exp.path / "figures")
    return report


def _write_pngs(figures: dict[str, go.Figure], folder: Path) -> None:
    """PNG export needs kaleido and a Chromium; without them, say how to get them instead of failing."""
    folder.mkdir(exist_ok=True)
    files = [folder / f"{name}.png" for name in figures]
    try:
        pio.write_images(list(figures.values()), files, width=[f.layout.width for f in figures.values()],
                         height=[f.layout.height for f in figures.values()])
    except Exception as err:  # noqa: BLE001 - a missing or broken browser must not fail the report
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"PNGs skipped ({reason}): install Chromium (`apt-get install -y chromium`, or "
              f"`plotly_get_chrome`) and rerun `python -m ltsearch report {folder.parent}`")
        return
    print(f"wrote {len(files)} PNGs to {folder}")
