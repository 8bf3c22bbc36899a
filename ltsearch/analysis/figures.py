"""Plotly figures of an `Experiment`, each drawn from one frame of `frames.py`.

Axes name the searched parameter with its unit; in a staged search each parameter is plotted from the
phase that sampled it. A choice's axis lists the options its trials sampled (`frames.choice_labels`), never
one they did not. Missing groups (few-shot in CIFAR-10-LT) are left out, never drawn as 0.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .experiment import OUTCOMES, Experiment
from .frames import (
    GROUPS,
    NOT_SAMPLED,
    accuracy_frame,
    choice_labels,
    confirmation_frame,
    group_column,
    importance_frame,
    pareto_frame,
    per_class_frame,
    plotted_accuracies,
    progress_frame,
    selection_frame,
    survival_frame,
)

__all__ = [
    "OUTCOME_SYMBOLS", "accuracy_figure", "accuracy_figures", "importance_figure", "parallel_coordinates_figure",
    "pareto_figure", "per_class_figures", "progress_figure", "selection_figure", "survival_figure",
]

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
OUTCOME_SYMBOLS = dict(zip(OUTCOMES, ("star", "circle", "circle-open", "x"), strict=True))
NBN_COLOURS = {"NBN off": "#4C78A8", "NBN on": "#F58518"}
_SPLITS = {"test": "Test", "val": "Validation"}
FONT_SIZE = 14
WIDE, TALL = 1200, 720


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


# ---------------------------------------------------------------------------- accuracy vs regularisation


def accuracy_figure(exp: Experiment, key: str, split: str = "test") -> go.Figure:
    """Accuracy of every trial against one searched parameter, one panel per accuracy group (overall and
    shot groups in the first row, size terciles in the second); coloured by NBN on/off when `model.nbn`
    was searched; the best trial (by validation) is a star, ASHA-stopped trials are open circles.
    Against tau, the accuracy is the tau-normalised classifier's (`final_tau_*`): tau changes nothing else.
    A stopped trial whose last epoch has no test figures shows its best-by-validation epoch's (the hover
    says which; `frames.plotted_accuracies`)."""
    tau = key == "posthoc.tau" and group_column(f"tau_{split}", "overall") in exp.results
    measured = f"tau_{split}" if tau else split
    frame, rows, orders = accuracy_frame(exp, measured), exp.rows_sampling(key), {}
    if exp.space[key]["kind"] == "choice":  # categorical axis: the options sampled, in the space file's order
        labels, categories = choice_labels(exp, key, rows)
        sampled = dict(zip(rows["trial_id"], labels))
        frame[key] = frame["trial_id"].map(sampled)
        frame = frame[frame[key].notna() & (frame[key] != NOT_SAMPLED)].copy()
        orders[key] = [c for c in categories if c != NOT_SAMPLED]
    else:
        frame = frame[frame["trial_id"].isin(rows["trial_id"])].dropna(subset=[key])
    present = [g for g in GROUPS if g in set(frame["group"])]
    shot = [g for g in present if g in SHOT_GROUPS]
    orders.update(outcome=list(OUTCOME_SYMBOLS), group=[GROUP_PANELS[g] for g in present])
    frame["group"] = frame["group"].map(GROUP_PANELS)
    colour = None
    if "model.nbn" in exp.space and key != "model.nbn":
        colour = "NBN"
        frame[colour] = np.where(frame["model.nbn"].astype(str).str.lower() == "true", "NBN on", "NBN off")
    wrap = max(len(shot), len(present) - len(shot))
    bars = {}
    if "accuracy_lo" in frame:  # validation accuracy: error bars of the validation set's 95 % interval
        frame["above"] = frame["accuracy_hi"] - frame["accuracy"]
        frame["below"] = frame["accuracy"] - frame["accuracy_lo"]
        bars = {"error_y": "above", "error_y_minus": "below"}
    fig = px.scatter(frame, x=key, y="accuracy", facet_col="group", color=colour,
                     facet_col_wrap=wrap, facet_row_spacing=0.16,
                     symbol="outcome", symbol_map=OUTCOME_SYMBOLS, color_discrete_map=NBN_COLOURS,
                     category_orders=orders, hover_data=[c for c in ("trial_id", "accuracy_at") if c in frame],
                     labels={"accuracy": _metric_label(f"{measured}_acc"), "outcome": "trial",
                             "accuracy_at": "from its"}, **bars)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_traces(marker={"size": 11})
    fig.update_traces(marker={"size": 18}, selector=lambda t: "best" in (t.name or ""))
    axis = _key_axis(exp, key, frame[key])
    fig.update_xaxes(showticklabels=True, **{**axis, "title_text": None})
    # an explicit x range on matched log axes breaks plotly.js's shared y autorange: set y from the data
    low, high = frame["accuracy"].min(), frame["accuracy"].max()
    if bars:
        low, high = frame["accuracy_lo"].min(), frame["accuracy_hi"].max()
    pad = 0.08 * max(high - low, 10.0)
    fig.update_yaxes(range=[max(low - pad, -3), min(high + pad, 103)])
    fig.add_annotation(text=axis["title_text"], xref="paper", yref="paper", x=0.5, y=0, yanchor="top",
                       yshift=-40, showarrow=False, font={"size": FONT_SIZE + 2})
    what = f"{_SPLITS.get(split, split)} accuracy{' (tau-normalised classifier)' if tau else ''}"
    what += " with 95% intervals" if bars else ""
    return _style(fig, f"{what} vs {_key_name(key)} ({exp.name})",
                  height=TALL if len(present) > wrap else 460)


def accuracy_figures(exp: Experiment, split: str = "test") -> dict[str, go.Figure]:
    """`accuracy_figure` for every searched parameter, named `accuracy_vs_<key>`."""
    return {f"accuracy_vs_{key.replace('.', '_')}": accuracy_figure(exp, key, split) for key in exp.space
            if _was_sampled(exp, key)}


def _was_sampled(exp: Experiment, key: str) -> bool:
    """Whether a trial sampled `key` (a choice of None counts: results.csv holds it as a missing value)."""
    rows = exp.rows_sampling(key)
    if exp.space[key]["kind"] == "choice":
        return bool((choice_labels(exp, key, rows)[0] != NOT_SAMPLED).any())
    return bool(rows[key].notna().any())


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


# ---------------------------------------------------------------------------- per class


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


# ---------------------------------------------------------------------------- the search itself


TIE_COLOURS = {"tied with the best": "#F58518", "resolved: worse than the best": "#9E9E9E",
               "no interval": "#4C78A8"}


def selection_figure(exp: Experiment) -> go.Figure:
    """The top trials by the objective (validation), best first, each with the validation set's 95 %
    interval, coloured by whether it is statistically tied with the best. With a confirmation phase, each
    confirmed configuration also shows its re-trainings with fresh seeds (small diamonds) and their mean
    and std (a black bar); the chosen configuration is starred."""
    frame = selection_frame(exp)
    frame["verdict"] = frame["tied_with_best"].map(
        {True: "tied with the best", False: "resolved: worse than the best"}).fillna("no interval")
    frame["label"] = [f"#{r} {t}" for r, t in zip(frame["rank"], frame["trial_id"])]
    objective = _metric_label(exp.objective)
    confirm = confirmation_frame(exp)
    shift = 0.15 if not confirm.empty else 0.0  # search runs left, fresh-seed runs right of each rank
    fig = go.Figure()
    for verdict, colour in TIE_COLOURS.items():
        part = frame[frame["verdict"] == verdict]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=part["rank"] - shift, y=part["objective"], mode="markers", name=f"search run: {verdict}",
            marker={"color": colour, "size": 11}, customdata=part[["lo", "hi"]], text=part["label"],
            error_y={"type": "data", "array": part["hi"] - part["objective"],
                     "arrayminus": part["objective"] - part["lo"], "color": colour, "thickness": 2},
            hovertemplate="%{text}: %{y:.2f} (95% %{customdata[0]:.1f}-%{customdata[1]:.1f})<extra></extra>"))
    if not confirm.empty:  # right of each confirmed configuration's search run
        ranks = dict(zip(frame["trial_id"], frame["rank"]))
        confirm = confirm[confirm["confirmed_trial"].isin(ranks)]
        confirm["x"] = confirm["confirmed_trial"].map(ranks) + shift
        fig.add_trace(go.Scatter(x=confirm["x"], y=confirm["objective"], mode="markers",
                                 name="re-trained with a fresh seed", customdata=confirm["seed"],
                                 marker={"symbol": "diamond", "size": 9, "color": "#54A24B"},
                                 hovertemplate="seed %{customdata}: %{y:.2f}<extra></extra>"))
        means = confirm.drop_duplicates("confirmed_trial")
        fig.add_trace(go.Scatter(x=means["x"], y=means["mean_objective"], mode="markers",
                                 name="mean ± std over the fresh seeds",
                                 marker={"symbol": "line-ew-open", "size": 26, "color": "black",
                                         "line": {"width": 3}},
                                 error_y={"type": "data", "array": means["std_objective"].fillna(0),
                                          "color": "black", "thickness": 1.5}))
    chosen = frame[frame["chosen"]]
    fig.add_trace(go.Scatter(x=chosen["rank"], y=chosen["hi"].fillna(chosen["objective"]) + 2, mode="markers",
                             name="chosen" + (" (best mean over seeds)" if not confirm.empty else ""),
                             marker={"symbol": "star", "size": 18, "color": "#E45756"}))
    fig.update_xaxes(title_text="trials ranked by the search objective (validation), best first",
                     tickvals=frame["rank"].tolist(), ticktext=frame["label"].tolist(), tickangle=-45,
                     range=[0.4, len(frame) + 0.6])
    fig.update_yaxes(title_text=objective)
    images = exp.validation_images.get("overall")
    size = f" ({images:,} validation images)" if images else ""
    fig.update_layout(legend={"orientation": "h", "y": -0.45, "x": 0})
    return _style(fig, f"Selection: validation {objective.split(' (')[0].removeprefix('validation ')} with 95% "
                       f"intervals{size} ({exp.name})", height=620)



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
        if "best_so_far_lo" in frame:  # the band a new best must clear to be more than validation noise
            fig.add_trace(go.Scatter(x=frame[x], y=frame["best_so_far_hi"], mode="lines", line_shape="hv",
                                     line={"width": 0}, showlegend=False, hoverinfo="skip"), row=1, col=col)
            fig.add_trace(go.Scatter(x=frame[x], y=frame["best_so_far_lo"], mode="lines", line_shape="hv",
                                     line={"width": 0}, fill="tonexty", fillcolor="rgba(228,87,86,0.15)",
                                     name="95% interval of the best (validation set)", showlegend=col == 1,
                                     hoverinfo="skip"), row=1, col=col)
        fig.add_trace(go.Scatter(x=frame[x], y=frame["best_so_far"], mode="lines", line_shape="hv",
                                 name="best so far", line={"color": "#E45756", "width": 3},
                                 showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(rangemode="tozero")
    fig.update_xaxes(title_text="cumulative training epochs (all trials)", row=1, col=1)
    fig.update_xaxes(title_text="wall-clock time since the search started (s)", row=1, col=2)
    fig.update_yaxes(title_text=_metric_label(exp.objective), row=1, col=1)
    objective = _metric_label(exp.objective).split(" (")[0]
    return _style(fig, f"Search progress: best {objective} so far ({exp.name})")


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
    rows = plotted_accuracies(exp.final_rows(), split).dropna(subset=["objective"])
    dimensions = []
    for key, dist in exp.space.items():
        values = rows[key]
        if dist["kind"] == "choice":  # the options these trials sampled; each tick on its lines (an explicit range)
            labels, options = choice_labels(exp, key, rows)
            dimensions.append({"label": _key_name(key), "values": labels.map({o: i for i, o in enumerate(options)}),
                               "tickvals": list(range(len(options))), "ticktext": options,
                               "range": [-0.5, len(options) - 0.5]})
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
