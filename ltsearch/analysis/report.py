"""The report of a finished search: one self-contained HTML page (plotly.js embedded once) with the top
trials, the best configuration and every figure, plus the figures as PNGs when kaleido finds a Chromium."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import yaml

from ..files import atomic_write_text
from ..selection import is_missing
from ..storage import Location
from .experiment import Experiment, load_experiment
from .figures import (
    accuracy_figures,
    importance_figure,
    parallel_coordinates_figure,
    pareto_figure,
    per_class_figures,
    progress_figure,
    selection_figure,
    survival_figure,
)
from .frames import top_trials

__all__ = ["NoSuccessfulTrialError", "all_figures", "write_report"]


class NoSuccessfulTrialError(ValueError):
    """No trial reported the objective (every trial failed, or none ran): there is nothing to plot."""


def all_figures(exp: Experiment, split: str = "test") -> dict[str, go.Figure]:
    """Every figure of the report, by file name stem. The per-class figures are left out, with a printed
    line, when the folder lacks what they need (pruned checkpoints, data no longer at its path)."""
    figures = accuracy_figures(exp, split)
    try:
        figures.update(per_class_figures(exp, split))
    except (OSError, ValueError, KeyError) as err:
        print(f"per-class figures skipped: {err}")
    figures.update(selection=selection_figure(exp), search_progress=progress_figure(exp),
                   asha_survival=survival_figure(exp),
                   parallel_coordinates=parallel_coordinates_figure(exp, split),
                   param_importances=importance_figure(exp), pareto=pareto_figure(exp, split))
    return figures


def _check_successful(exp: Experiment) -> None:
    rows = exp.final_rows()
    if rows["objective"].notna().any():
        return
    if rows.empty:
        raise NoSuccessfulTrialError(f"{exp.path}: no successful trial to report: results.csv lists no trial")
    failed = int((rows["status"] == "ERROR").sum())
    raise NoSuccessfulTrialError(
        f"{exp.path}: no successful trial to report: none of its {len(rows)} trial(s) reported "
        f"{exp.objective} ({failed} ended with status ERROR; results.csv gives their stop_reason)")


def _interval_columns(exp: Experiment, table: pd.DataFrame) -> pd.DataFrame:
    """The objective's interval as one "95% interval" column next to it, and ties as a mark."""
    table = table.copy()
    if "objective_lo" in table:
        interval = [("" if is_missing(lo) else f"{lo:.1f}-{hi:.1f}")
                    for lo, hi in zip(table.pop("objective_lo"), table.pop("objective_hi"))]
        table.insert(table.columns.get_loc("objective") + 1, "95% interval", interval)
    for column, title in (("tied_unpaired", "tied, unpaired rule"), ("tied_with_best", "tied with best")):
        if column in table:  # both land after the interval, the paired rule's first
            at = table.columns.get_loc("objective") + 1 + ("95% interval" in table)
            table.insert(at, title, table.pop(column).map(_tie_mark))
    return table


def _tie_mark(value) -> str:
    return "tied" if not is_missing(value) and str(value).lower() == "true" else ""


def _validation_html(exp: Experiment) -> str:
    """What the validation set can resolve: its size, the best trial's interval, the ties."""
    images = exp.validation_images
    rows = exp.final_rows()
    parts = []
    if images:
        per_class = exp.summary.get("validation", {}).get("per_class")
        parts.append(f"Validation set: {images['overall']:,} images"
                     + (f" ({per_class} per class)" if per_class else "") + ".")
    note = exp.summary.get("validation", {}).get("note")
    rule = _tie_rule(rows)
    if note:  # what the search printed: the best's interval, the ties and the size that would resolve them
        return f"<p>{html.escape(note[0].upper() + note[1:])}. Ties are marked in the table ({rule}).</p>"
    best = rows[rows["trial_id"] == exp.search_pick]
    if len(best) and "objective_lo" in best and not is_missing(best["objective_lo"].iat[0]):
        b = best.iloc[0]
        parts.append(f"The search's best trial scores {b['objective']:.2f} with a 95% interval of "
                     f"{b['objective_lo']:.1f}-{b['objective_hi']:.1f}.")
    if "tied_with_best" in rows:
        ties = int((rows["tied_with_best"].map(_tie_mark) == "tied").sum())
        unpaired = ("" if "tied_unpaired" not in rows or not (rows.get("tie_test") == "mcnemar").any() else
                    f"; {int((rows['tied_unpaired'].map(_tie_mark) == 'tied').sum())} by the unpaired interval")
        parts.append(f"{ties} of {int(rows['objective'].notna().sum())} trials are statistically tied with it "
                     f"({rule}{unpaired}; marked in the table).")
    return f"<p>{html.escape(' '.join(parts))}</p>" if parts else ""


def _tie_rule(rows: pd.DataFrame) -> str:
    """How `tied_with_best` was decided (`ltsearch.selection.compare_with_best`)."""
    unpaired = "Newcombe's interval of the difference to the best contains 0"
    if "tie_test" not in rows or not (rows["tie_test"] == "mcnemar").any():
        return unpaired
    return ("McNemar's exact test on the validation images the two trials disagree on does not reject at 5 %; "
            f"for a trial without kept predictions, {unpaired}")


def _confirmation_html(exp: Experiment) -> str:
    """The search's pick against the configuration the confirmation chose by its mean over fresh seeds."""
    confirmed = exp.confirmation
    if confirmed.empty:
        return ""
    seeds = exp.summary.get("confirm", {}).get("seeds", [])
    picked, search_pick = exp.best_trial, exp.search_pick
    verdict = (f"The confirmation kept the search's pick, trial {search_pick}." if picked == search_pick else
               f"The confirmation changed the choice: trial {picked} has the best mean, not the search's pick "
               f"{search_pick}, whose single run was the highest.")
    columns = [c for c in ("confirm_rank", "confirmed_trial", *exp.space, "search_objective", "mean_objective",
                           "std_objective", "mean_val_acc", "std_val_acc", "mean_test_acc", "std_test_acc",
                           "runs_ok", "runs") if c in confirmed]
    table = confirmed[columns].rename(columns={"search_objective": "search run", "mean_objective": "mean",
                                               "std_objective": "std", "runs_ok": "runs ok"})
    return (f"<h2>Confirmation: the top {len(confirmed)} re-trained with fresh seeds {html.escape(str(seeds))}"
            f"</h2><p>Objective {html.escape(exp.objective)} (validation) of each configuration's search run "
            f"against its mean and standard deviation over the fresh seeds; the choice is the best mean. Test "
            f"accuracy is reported, never used to choose. {html.escape(verdict)}</p>"
            f'<div style="overflow-x: auto">{_table_html(exp, table)}</div>')


def _table_html(exp: Experiment, table: pd.DataFrame) -> str:
    formatted = _interval_columns(exp, table)
    for column in formatted.columns:
        if column in exp.space and exp.space[column]["kind"] == "loguniform":
            formatted[column] = formatted[column].map(lambda v: "" if is_missing(v) else f"{v:.2e}")
        elif pd.api.types.is_float_dtype(formatted[column]):  # accuracies keep 2 decimals: 28.49 vs 28.47
            digits = 3 if column in exp.space else 4
            formatted[column] = formatted[column].map(lambda v, d=digits: "" if is_missing(v) else f"{v:.{d}g}")
    labels = {"objective": f"objective: {exp.objective}"}
    return formatted.rename(columns=labels).to_html(index=False, border=0, classes="trials")


def write_report(path: str | Path, png: bool = True) -> Path:
    """Write `path/report.html` (self-contained: plotly.js embedded once) and, when kaleido finds a Chromium,
    `path/figures/*.png`. Returns the report's path. Raises NoSuccessfulTrialError when no trial reported
    the objective."""
    exp = load_experiment(path)
    _check_successful(exp)
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
    chosen_by = ", the best mean over fresh seeds" if not exp.confirmation.empty else ""
    # the table has a column per searched key: wider than the page, it scrolls in its own box
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
{_validation_html(exp)}
<div style="overflow-x: auto">{_table_html(exp, top_trials(exp))}</div>
{_confirmation_html(exp)}
<h2>Best configuration (trial {html.escape(str(exp.best_trial))}{chosen_by})</h2>
<pre>{html.escape(best_config)}</pre>
<h2>Figures</h2><ul>{contents}</ul>
{"".join(parts)}
</body></html>
"""
    report = exp.path / "report.html"
    atomic_write_text(report, page)
    if png:
        _write_pngs(figures, exp.path / "figures")
    if exp.source is not None:  # an experiment in object storage: the report goes next to its results
        target = Location(exp.source)
        (target / "report.html").upload(report)
        if (exp.path / "figures").is_dir():
            (target / "figures").upload(exp.path / "figures")
        print(f"wrote {target / 'report.html'} (and a local copy, {report})")
    else:
        print(f"wrote {report}")
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
