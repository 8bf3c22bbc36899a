"""Experiment tracking: Ray Tune's logger callbacks for TensorBoard and MLflow (`search.loggers`).

Each trial's per-epoch results and its sampled values go to the tools a user already watches. TensorBoard
event files sit in each trial's folder under `runs/NAME/<phase>/` (`tensorboard --logdir runs/NAME`);
MLflow gets one run per trial in the experiment `NAME/<phase>` of `search.mlflow_tracking_uri`, by default
a SQLite store in the experiment folder (`mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow.db`;
MLflow 3 keeps its plain-folder store only in maintenance mode). Staged mode's
second phase runs as Ray tasks, not Tune trials: its trials are in `results.csv` and the Optuna study.
"""
from __future__ import annotations

from ray.tune.logger import TBXLoggerCallback

from ..space import SearchSettings
from ..storage import Location, local_mirror

__all__ = ["logger_callbacks", "mlflow_uri"]


def mlflow_uri(settings: SearchSettings, exp: Location) -> str:
    """The tracking URI: the setting, else SQLite in the experiment folder (on the driver's disk when the
    experiment is in object storage: give a tracking server there)."""
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    exp = Location(exp)
    folder = exp.local_path if exp.is_local else local_mirror(exp, "mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


def logger_callbacks(settings: SearchSettings, exp: Location, phase: str) -> list:
    callbacks = []
    if "tensorboard" in settings.loggers:
        callbacks.append(TBXLoggerCallback())
    if "mlflow" in settings.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(settings, exp),
                                              experiment_name=f"{exp.name}/{phase}"))
    return callbacks
