"""Distributed search with Ray Tune (Optuna + ASHA) over Ray Train trials: the only package importing Ray.

    result = run_search(load_search_space("search_spaces/quickstart.yaml"), storage="runs")

Modules: `resources` (cluster sizing) and `results` (result rows, the best row) are pure and need no Ray;
`trials` (the Tune trainable), `tune_phase` (a Tune experiment and its Optuna searcher), `staged` (staged
mode's second phase as Ray tasks) and `experiment` (the experiment folder, `run_search`).
"""
from .experiment import EXPERIMENT_MARKER, SearchResult, connect, run_search
from .results import STAGE1_TRIAL

__all__ = ["EXPERIMENT_MARKER", "STAGE1_TRIAL", "SearchResult", "connect", "run_search"]
