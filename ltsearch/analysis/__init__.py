"""Analysis of a finished search: tidy pandas frames and plotly figures of accuracy against regularisation.

    exp = load_experiment("runs/quickstart-20260101-120000")
    accuracy_frame(exp)                         # one row per trial and accuracy group
    for fig in accuracy_figures(exp).values():  # one figure per searched parameter
        fig.show()
    write_report("runs/quickstart-20260101-120000")   # report.html and figures/*.png

`experiment` reads the folder, `frames` turns it into pandas frames, `figures` draws each frame with
plotly, `report` writes them all into one HTML page. Accuracies are percentages of the TEST split by
default (the search selected on validation; test is what it reports).
"""
from .experiment import Experiment, load_experiment
from .figures import (
    OUTCOME_SYMBOLS,
    accuracy_figure,
    accuracy_figures,
    importance_figure,
    parallel_coordinates_figure,
    pareto_figure,
    per_class_figures,
    progress_figure,
    selection_figure,
    survival_figure,
)
from .frames import (
    accuracy_frame,
    confirmation_frame,
    importance_frame,
    naive_baseline_trial,
    pareto_frame,
    per_class_frame,
    progress_frame,
    selection_frame,
    survival_frame,
    top_trials,
)
from .report import NoSuccessfulTrialError, all_figures, write_report

__all__ = [
    "OUTCOME_SYMBOLS", "Experiment", "NoSuccessfulTrialError", "accuracy_figure", "accuracy_figures",
    "accuracy_frame", "all_figures", "confirmation_frame", "importance_figure", "importance_frame",
    "load_experiment", "naive_baseline_trial", "parallel_coordinates_figure", "pareto_figure", "pareto_frame",
    "per_class_figures", "per_class_frame", "progress_figure", "progress_frame", "selection_figure",
    "selection_frame", "survival_figure", "survival_frame", "top_trials", "write_report",
]
