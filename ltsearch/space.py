"""Search-space files: a `base` experiment config, a `space` of dotted keys and a `search` section.

    base:   {data: {...}, model: {...}, stage1: {...}, ...}   # a full experiment config
    space:
      stage1.weight_decay: {loguniform: [1.0e-4, 1.0e-1]}
      model.nbn: {choice: [false, true]}
      model.nbn_scale_weight_decay: {choice: [true, false], when: {model.nbn: true}}
    search: {num_samples: 8, metric: val_acc, ...}

Everything is validated here, before Ray starts: every dotted key must name a field of the experiment
config, every bound must be a number of the field's type and every sampled config must validate. The
space becomes an Optuna define-by-run function, so conditional (`when`) entries are native.

Every searched key must be able to move a search metric (`inert_reason`): a key that acts only through another
key's value (`posthoc.tau` through a linear classifier, a loss parameter through its loss) is refused when no
value that other key can take while this one is sampled lets it act. A key searched only under `when` takes its
sampled values where its condition holds and keeps its base value where the condition fails, and both count:
`model.classifier: {choice: [cosine], when: {stage1.loss: ldam}}` over a linear base leaves every trial without
LDAM linear, so `posthoc.tau` can be searched beside it.
"""
from __future__ import annotations

import builtins
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .config import (
    ConfigError,
    ExperimentConfig,
    StrictModel,
    apply_overrides,
    format_validation_error,
    load_yaml,
    parse_overrides,
    validate_config,
)

__all__ = [
    "DISTRIBUTIONS",
    "STAGE2_PREFIXES",
    "Confirm",
    "Distribution",
    "SearchSettings",
    "SearchSpaceFile",
    "flat_config",
    "inert_reason",
    "load_search_space",
    "suggest",
]

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "int", "choice")
# Keys a `staged` search samples in its second phase, on cached stage-1 features.
STAGE2_PREFIXES = ("stage2.", "posthoc.")


class Distribution(StrictModel):
    """One entry of `space`: exactly one distribution key, optionally a `when` condition."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    quniform: tuple[float, float, float] | None = None  # [low, high, step]
    int: tuple[builtins.int, builtins.int] | None = None  # inclusive bounds
    choice: list[Any] | None = None
    when: dict[str, Any] = Field(default_factory=dict)  # sample only when these (earlier-sampled or base) keys have these values

    @model_validator(mode="after")
    def _one_distribution(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {list(DISTRIBUTIONS)}, got {given or 'none'}")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one option")
            return self
        low, high = getattr(self, kind)[:2]
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"{kind} range must be [low, high] with low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform bounds must be > 0, got [{low}, {high}]")
        if kind == "quniform" and not self.quniform[2] > 0:
            raise ValueError(f"quniform step must be > 0, got {self.quniform[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def values_for_check(self) -> list[Any]:
        """Values to validate against the config schema: every choice, or both bounds and a point between
        them (fractional for continuous kinds, so a float distribution on an integer field is refused)."""
        if self.kind == "choice":
            return list(self.choice)
        low, high = getattr(self, self.kind)[:2]
        if self.kind == "int":
            return [low, high]
        return [low, high, low + 0.3711 * (high - low)]


class Scheduler(StrictModel):
    """ASHA on the global epoch (stage-1 epochs then stage-2 epochs)."""

    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    enabled: bool = True


class Sampler(StrictModel):
    type: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0)  # random trials before TPE models the space


class Resources(StrictModel):
    num_workers: int = Field(1, ge=1)  # Ray Train workers (DDP ranks) per trial
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)  # None: 1 if the cluster has GPUs, else 0; fractions ok

    @model_validator(mode="after")
    def _ranks_do_not_share_gpus(self) -> Resources:
        """Fractions pack one-worker trials on a GPU; Ray would also pack one trial's DDP ranks on one GPU,
        and NCCL refuses that ('Duplicate GPU detected', ray-project/ray#48012)."""
        if self.num_workers > 1 and self.gpus_per_worker is not None and 0 < self.gpus_per_worker < 1:
            raise ValueError(f"gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: "
                             "DDP ranks cannot share a GPU; fractions are for one-worker trials")
        return self


class Staged(StrictModel):
    """Second phase of a `staged` search: stage 2 on features cached from the best stage-1 checkpoints."""

    top_k: int = Field(2, ge=1)  # stage-1 checkpoints (best by validation) to build on
    num_samples: int = Field(30, ge=1)  # stage-2 trials
    views: int = Field(4, ge=1)  # augmented views of the training set cached per checkpoint
    # A finished `python -m ltsearch train --out DIR` run to build stage 2 on, instead of searching stage 1:
    # its best-by-validation checkpoint is the one parent (for a long stage 1 trained once, e.g. 200 epochs).
    stage1_run: str | None = None


class Confirm(StrictModel):
    """After the search: re-train the `top_k` best configurations by validation once per seed of `seeds`
    (fresh `trainer.seed` values) and choose the best MEAN validation objective over those seeds."""

    top_k: int = Field(3, ge=1)  # configurations to confirm (staged mode: stage-2 configurations)
    seeds: list[int] = Field(min_length=1)  # trainer.seed of each re-training; the search's own seed excluded

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


class SearchSettings(StrictModel):
    mode: Literal["joint", "staged"] = "joint"
    num_samples: int = Field(8, ge=1)
    metric: str | list[str] = "val_acc"  # a list runs multi-objective Optuna; ASHA uses the first
    direction: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    scheduler: Scheduler = Scheduler()
    sampler: Sampler = Sampler()
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the cluster's resources allow
    resources: Resources = Resources()
    staged: Staged = Staged()
    max_failures: int = Field(2, ge=0)  # restarts of a trial from its last checkpoint
    keep_checkpoints: int = Field(2, ge=1)  # checkpoints kept per trial
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)  # experiment tracking
    mlflow_tracking_uri: str | None = None  # None: SQLite in the experiment folder (mlflow.db)
    confirm: Confirm | None = None  # None: the search's best single run is the choice
    # SQLAlchemy URL of the Optuna studies' database (postgresql://user@host/db); None: SQLite, in the
    # experiment folder, or copied there from the driver's disk when the experiment is in object storage
    optuna_storage: str | None = None

    @field_validator("optuna_storage")
    @classmethod
    def _database_url(cls, url):
        if url is not None and not re.match(r"^[a-z][a-z0-9+]*://", url):
            raise ValueError(f"{url!r} is not a database URL (e.g. postgresql://user@host:5432/optuna)")
        return url

    @field_validator("metric")
    @classmethod
    def _metric_names(cls, metric):
        for name in [metric] if isinstance(metric, str) else metric:
            if not (name.startswith(("val_", "tau_val_", "best_val_", "train_"))):
                raise ValueError(f"metric {name!r} must be a validation or training metric (val_*, tau_val_*, "
                                 "best_val_*, train_*): selecting on the test set is not allowed")
        if isinstance(metric, list) and not metric:
            raise ValueError("metric list is empty")
        return metric

    @model_validator(mode="after")
    def _directions(self) -> SearchSettings:
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric
        directions = [self.direction] * len(metrics) if isinstance(self.direction, str) else self.direction
        if len(directions) != len(metrics):
            raise ValueError(f"direction has {len(directions)} entries for {len(metrics)} metrics")
        return self

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def directions(self) -> list[str]:
        return [self.direction] * len(self.metrics) if isinstance(self.direction, str) else list(self.direction)


class SearchSpaceFile(StrictModel):
    base: ExperimentConfig
    space: dict[str, Distribution]
    search: SearchSettings = SearchSettings()

    def max_epochs(self, phase: str = "all") -> int:
        """The most global epochs a sampled configuration can plan (ASHA's horizon): stage 1, plus stage 2
        when it can be enabled (`phase` `all`), or stage 1 alone (`stage1`)."""
        def most(key: str) -> int:
            dist = self.space.get(key)
            if dist is None:
                return flat_config(self.base)[key]
            return max(dist.choice) if dist.kind == "choice" else dist.int[1]

        total = most("stage1.epochs")
        enabled = self.space.get("stage2.enabled")
        if phase == "all" and (self.base.stage2.enabled or (enabled and True in (enabled.choice or []))):
            total += most("stage2.epochs")
        return total

    def sample_keys(self, phase: str = "all") -> list[str]:
        """Keys of `space` sampled in a phase: `all`, `stage1` (staged mode's first phase) or `stage2`."""
        if phase == "all":
            return list(self.space)
        second = [k for k in self.space if k.startswith(STAGE2_PREFIXES)]
        return second if phase == "stage2" else [k for k in self.space if k not in second]


def suggest(trial, space: dict[str, Distribution], base: dict[str, Any]) -> None:
    """Optuna define-by-run: sample each key of `space` on `trial` (skipping unmet `when` conditions)."""
    values = dict(base)
    for key, dist in space.items():
        if any(values.get(k) != v for k, v in dist.when.items()):
            continue
        kind = dist.kind
        if kind == "loguniform":
            values[key] = trial.suggest_float(key, *dist.loguniform, log=True)
        elif kind == "uniform":
            values[key] = trial.suggest_float(key, *dist.uniform)
        elif kind == "quniform":
            low, high, step = dist.quniform
            values[key] = trial.suggest_float(key, low, high, step=step)
        elif kind == "int":
            values[key] = trial.suggest_int(key, *dist.int)
        else:
            values[key] = trial.suggest_categorical(key, dist.choice)


def flat_config(config: ExperimentConfig) -> dict[str, Any]:
    """`{"stage1.weight_decay": 0.005, ...}`: the config under the dotted keys a space uses."""
    return {f"{section}.{key}": value for section, fields in config.model_dump().items()
            for key, value in fields.items()}


def _set_nested(mapping: dict, path: list[str], value: Any) -> dict:
    """Copy of `mapping` with mapping[path[0]][path[1]]... = value."""
    out = dict(mapping)
    out[path[0]] = value if len(path) == 1 else _set_nested(dict(out.get(path[0]) or {}), path[1:], value)
    return out


def load_search_space(path: str | Path, overrides: list[str] | None = None,
                      num_samples: int | None = None) -> SearchSpaceFile:
    """Load and fully validate a search-space file; raise ConfigError with one line per problem.

    `overrides` are `section.key=value` strings applied to `base` (`search.key=value` to `search`).
    """
    source = str(path)
    raw = load_yaml(path)
    unknown = set(raw) - set(SearchSpaceFile.model_fields)
    if unknown:
        raise ConfigError(f"{source}: {min(unknown)}: unknown top-level key; expected base, space, search")
    for section in ("base", "space"):
        if section not in raw:
            raise ConfigError(f"{source}: {section}: missing section")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section}: expected a mapping, got {type(raw[section]).__name__}")
    values = parse_overrides(overrides or [])
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{source}: search: expected a mapping, got {type(search_raw).__name__}")
    for key in [k for k in values if k.startswith("search.")]:
        search_raw = _set_nested(search_raw, key.removeprefix("search.").split("."), values.pop(key))
    if num_samples is not None:
        search_raw["num_samples"] = num_samples
    base_raw = apply_overrides(raw["base"], values)
    try:
        base = ExperimentConfig.model_validate(base_raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, "base")) from None
    space = {}
    for key, spec in raw["space"].items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: space.{key}: expected a mapping such as {{loguniform: [1e-4, 1e-1]}}")
        try:
            space[key] = Distribution.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source, f"space.{key}")) from None
    try:
        search = SearchSettings.model_validate(search_raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, "search")) from None

    flat = flat_config(base)
    for key, dist in space.items():
        if key not in flat:
            raise ConfigError(f"{source}: space.{key}: not a key of the experiment config "
                              "(expected section.key, e.g. stage1.weight_decay)")
        for cond in dist.when:
            if cond not in flat:
                raise ConfigError(f"{source}: space.{key}.when.{cond}: not a key of the experiment config")
        for value in dist.values_for_check():
            try:
                validate_config(apply_overrides(base.model_dump(), {key: value}), f"{source}: space")
            except ConfigError as err:
                raise ConfigError(f"{err} (from space.{key} {dist.kind} value {value!r})") from None
    if search.mode == "staged" and not any(k.startswith(STAGE2_PREFIXES) for k in space):
        raise ConfigError(f"{source}: search.mode: staged needs stage2.* or posthoc.* keys in space")
    if search.mode == "staged" and (base.stage2.update_bn_stats or "stage2.update_bn_stats" in space):
        raise ConfigError(f"{source}: stage2.update_bn_stats: staged mode trains stage 2 on cached features of a "
                          "frozen backbone, so BN statistics cannot be updated; use search.mode: joint")
    if search.staged.stage1_run is not None:
        _check_stage1_run(source, search, space)
    if base.data.val_per_class == 0:
        for metric in search.metrics:
            if "val_" in metric:
                raise ConfigError(f"{source}: search.metric: {metric} needs a validation set, but "
                                  "base.data.val_per_class is 0")
    if search.confirm is not None:
        if "trainer.seed" in space:
            raise ConfigError(f"{source}: search.confirm: re-trains with its own trainer.seed values, so "
                              "trainer.seed cannot also be searched; remove it from space or drop confirm")
        if base.trainer.seed in search.confirm.seeds:
            raise ConfigError(f"{source}: search.confirm.seeds: {base.trainer.seed} is the search's own "
                              "trainer.seed; confirmation needs fresh seeds")
    for key in space:
        reason = inert_reason(key, space, base, search.metrics)
        if reason:
            raise ConfigError(f"{source}: space.{key}: {reason}")
    return SearchSpaceFile(base=base, space=space, search=search)


# Keys that change nothing unless another key has one of these values: key -> (key, test, what it needs).
_NEEDS: dict[str, tuple[str, Any, str]] = {
    "model.nbn_all_bn": ("model.nbn", lambda v: v is True, "model.nbn: true"),
    "model.nbn_scale_weight_decay": ("model.nbn", lambda v: v is True, "model.nbn: true"),
    "stage2.beta": ("stage2.loss", lambda v: str(v).startswith("cb_"), "a class-balanced stage2.loss (cb_*)"),
    "stage2.focal_gamma": ("stage2.loss", lambda v: v == "cb_focal", "stage2.loss: cb_focal"),
    "stage2.maxnorm_every": ("stage2.maxnorm_thresh", lambda v: v is not None, "a stage2.maxnorm_thresh"),
    "stage1.lr_milestones": ("stage1.lr_schedule", lambda v: v == "step", "stage1.lr_schedule: step"),
    "stage1.lr_gamma": ("stage1.lr_schedule", lambda v: v == "step", "stage1.lr_schedule: step"),
    "model.cosine_scale": ("model.classifier", lambda v: v == "cosine", "model.classifier: cosine"),
    # tau-normalising the rows of a cosine classifier changes no logit: it normalises them anyway
    "posthoc.tau": ("model.classifier", lambda v: v == "linear", "model.classifier: linear"),
    "stage1.drw_beta": ("stage1.drw_epoch", lambda v: v is not None, "a stage1.drw_epoch"),
    # LWS freezes the classifier, so there is nothing for MaxNorm to cap
    "stage2.maxnorm_thresh": ("stage2.mode", lambda v: v == "retrain", "stage2.mode: retrain"),
    **{f"{stage}.{key}": (f"{stage}.loss", lambda v, loss=loss: v == loss, f"{stage}.loss: {loss}")
       for stage in ("stage1", "stage2")
       for key, loss in (("label_smoothing", "ce"), ("logit_adjust_tau", "logit_adjusted"),
                         ("ldam_max_margin", "ldam"), ("ldam_scale", "ldam"))},
}


def _check_stage1_run(source: str, search: SearchSettings, space: dict[str, Distribution]) -> None:
    """`search.staged.stage1_run` fixes stage 1: only a staged search's second-phase keys may be sampled. (The
    run itself is read when the search starts: a shipped file may name a run that is made first.)"""
    run = search.staged.stage1_run
    if search.mode != "staged":
        raise ConfigError(f"{source}: search.staged.stage1_run: needs search.mode: staged")
    for key in space:
        if not key.startswith(STAGE2_PREFIXES):
            raise ConfigError(f"{source}: space.{key}: stage 1 is the finished run {run} "
                              "(search.staged.stage1_run); only stage2.* and posthoc.* keys can be searched")
    if search.confirm is not None:
        raise ConfigError(f"{source}: search.confirm: re-trains stage 1, which search.staged.stage1_run fixes; "
                          "drop one of them")


def _possible(key: str, dist: Distribution, space: dict[str, Distribution], base: ExperimentConfig,
              seen: tuple[str, ...] = ()) -> list[Any]:
    """Values `key` can take while `dist` is sampled: its `when` value; for a searched key, its own choices (a
    range: any value, so the marker `...`) where its own `when` can hold then, and its base value where that
    `when` can fail then (a key sampled only under `when` keeps its base value elsewhere); else its base value."""
    if key in dist.when:
        return [dist.when[key]]
    base_value = flat_config(base)[key]
    if key not in space:
        return [base_value]
    if key in seen:  # conditions in a circle: assume anything rather than refuse a key that can matter
        return [...]
    own = space[key]
    sampled = list(own.choice) if own.kind == "choice" else [...]
    met = [(value, _possible(other, dist, space, base, (*seen, key))) for other, value in own.when.items()]
    if not all(any(v is ... or v == value for v in values) for value, values in met):
        return [base_value]  # its condition never holds while `dist` is sampled
    if all(values == [value] for value, values in met):
        return sampled  # its condition always holds then
    return [*sampled, base_value]


def inert_reason(key: str, space: dict[str, Distribution], base: ExperimentConfig,
                 metrics: list[str]) -> str | None:
    """Why sampling `key` cannot change any of `metrics`, or None when it can. Such a key spends a search
    dimension on noise and makes parameter importances lie."""
    dist = space[key]
    if key.startswith("posthoc.") and not any(m.startswith("tau_") for m in metrics):
        return (f"cannot change metric {', '.join(metrics)}: post-hoc tau changes only the tau_* metrics "
                "(the tau-normalised classifier); select on tau_val_acc (tau 0 is the plain classifier), or "
                "remove the key")
    needs = []
    if key.startswith("stage2.") and key != "stage2.enabled":
        needs.append(("stage2.enabled", lambda v: v is True, "stage2.enabled: true"))
    if key in _NEEDS:
        needs.append(_NEEDS[key])
    for other, test, what in needs:
        values = _possible(other, dist, space, base)
        if not any(v is ... or test(v) for v in values):
            value = f"{values[0]!r}" if len(values) == 1 else f"one of {values}"
            return (f"has no effect: it needs {what}, but {other} is {value} whenever this key is sampled "
                    f"(set it in base, search it, or remove the key)")
    return None
