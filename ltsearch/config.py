"""Experiment configuration: validated, frozen pydantic models loaded from YAML.

Config flows one way: YAML file -> `load_config` (+ dotted overrides) -> `ExperimentConfig`
-> `train`. Nothing writes back into a config; a search builds a new one per trial with
`with_overrides`.

Names (models, losses, samplers, datasets) are checked against `ltsearch.catalog`, so validating a config
loads no torch. The parts never see a config: `ltsearch.build` turns one into their plain arguments.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .catalog import (
    CIFAR_DATASETS,
    IMAGE_DATASETS,
    LIST_DATASETS,
    LOSS_NAMES,
    MODEL_NAMES,
    REWEIGHTABLE,
    SAMPLER_NAMES,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PosthocConfig",
    "Stage1Config",
    "Stage2Config",
    "StrictModel",
    "TrainerConfig",
    "apply_overrides",
    "dump_config",
    "format_validation_error",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "with_overrides",
]


class ConfigError(ValueError):
    """A bad config file or value; the message is one line naming file, key and what was expected."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are rejected and instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_model(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_NAMES)}")
    return name


def _known_loss(name: str) -> str:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSS_NAMES)}")
    return name


def _known_sampler(name: str) -> str:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLER_NAMES)}")
    return name


ModelName = Annotated[str, AfterValidator(_known_model)]
LossName = Annotated[str, AfterValidator(_known_loss)]
SamplerName = Annotated[str, AfterValidator(_known_sampler)]


class DataConfig(StrictModel):
    """What is trained on. CIFAR is read from its python pickles and subsampled to a long tail; `image_folder`
    (train/<class>/ images, optional val/ and test/) is subsampled the same way; a list dataset is used as its
    train list says. Which keys apply to which dataset: README, "Your own dataset"."""

    dataset: Literal["cifar10", "cifar100", "image_list", "image_folder", "imagenet_lt", "places_lt",
                     "inat2018"] = "cifar100"
    # CIFAR: else $LTSEARCH_DATA, else ~/.cache/ltsearch/data. Image datasets (required): the folder the images
    # (and relative list paths) are under, made absolute when the config is loaded (trials run elsewhere).
    root: str | None = Field(None, validate_default=True)
    download: bool = False  # CIFAR only
    # n_max / n_min (CIFAR, image_folder). Default 100, but 1 for image_folder (the folder as it is) and for
    # list datasets, which are used as listed (any other value is refused there).
    imbalance_factor: float = Field(100.0, ge=1)
    profile: Literal["exp", "step"] = "exp"
    n_max: int | None = Field(None, gt=0)  # images of the largest class; default: the whole class pool
    # Balanced validation images per class, disjoint from train; taken from the training images when the
    # dataset has no validation list or val/ folder (inat2018, whose val list serves as its test set).
    val_per_class: int = Field(20, ge=0)
    subset_seed: int | None = None  # None: first n_i images of each class in file order (standard CIFAR-LT)
    # List datasets: files of "relative/path.jpg label" lines (paths relative to root; a relative list path
    # is relative to root too). The presets fill in their standard names; test_list None: no test set.
    train_list: str | None = Field(None, validate_default=True)
    val_list: str | None = Field(None, validate_default=True)  # None: val_per_class per class from train
    test_list: str | None = Field(None, validate_default=True)
    # Image datasets: side in pixels of the images the model sees (default 224; CIFAR is always 32).
    image_size: int | None = Field(None, ge=8, validate_default=True)
    # Image datasets: memory decodes every image once into a uint8 tensor (short side resized to image_size,
    # centre crop) trained with CIFAR's batch crop + flip; stream decodes in DataLoader workers every epoch with
    # random-resized crop, flip and colour jitter. auto: memory up to 64 px, stream above.
    pipeline: Literal["auto", "memory", "stream"] = "auto"
    workers: int | None = Field(None, ge=0)  # decoding processes per rank; None: trainer.num_threads, else all CPUs

    @model_validator(mode="before")
    @classmethod
    def _image_data_as_it_is(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("dataset") not in (None, *CIFAR_DATASETS):
            return {"imbalance_factor": 1.0, **raw}
        return raw

    @field_validator("root")
    @classmethod
    def _image_root(cls, root: str | None, info: ValidationInfo) -> str | None:
        dataset = info.data.get("dataset")
        if dataset is None or dataset in CIFAR_DATASETS:
            return root
        if root is None:
            raise ValueError(f"dataset {dataset} needs root, the folder its images are under")
        return os.path.abspath(os.path.expanduser(root))

    @field_validator("download")
    @classmethod
    def _cifar_download(cls, download: bool, info: ValidationInfo) -> bool:
        dataset = info.data.get("dataset")
        if download and dataset not in (None, *CIFAR_DATASETS):
            raise ValueError(f"only CIFAR can be downloaded; place the images of {dataset} under data.root")
        return download

    @field_validator("imbalance_factor", "n_max")
    @classmethod
    def _lists_used_as_listed(cls, value, info: ValidationInfo):
        dataset = info.data.get("dataset")
        if dataset in LIST_DATASETS and value not in (None, 1.0):
            raise ValueError(f"a list dataset ({dataset}) is used as its train list says; make the long tail in "
                             "the list, or use image_folder")
        return value

    @field_validator("train_list", "val_list", "test_list")
    @classmethod
    def _lists(cls, value: str | None, info: ValidationInfo) -> str | None:
        dataset = info.data.get("dataset")
        if dataset is None:
            return value
        if dataset not in LIST_DATASETS:
            if value is not None:
                raise ValueError(f"list files are for {', '.join(LIST_DATASETS)}; dataset is {dataset}")
            return value
        value = value if value is not None else getattr(IMAGE_DATASETS[dataset], info.field_name)
        if value is None and info.field_name == "train_list":
            raise ValueError(f"dataset {dataset} needs train_list, a file of 'relative/path.jpg label' lines")
        return value

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, size: int | None, info: ValidationInfo) -> int | None:
        dataset = info.data.get("dataset")
        if dataset in CIFAR_DATASETS:
            if size is not None:
                raise ValueError(f"{dataset} images are 32 px; image_size is for image datasets")
            return size
        return 224 if size is None else size

    @field_validator("pipeline")
    @classmethod
    def _cifar_in_memory(cls, pipeline: str, info: ValidationInfo) -> str:
        dataset = info.data.get("dataset")
        if dataset in CIFAR_DATASETS and pipeline == "stream":
            raise ValueError(f"{dataset} is read from its pickles into memory; stream is for image datasets")
        return pipeline


class ModelConfig(StrictModel):
    name: ModelName = "resnet32"
    nbn: bool = False  # Normalized BN on the last stage
    nbn_all_bn: bool = False  # normalise every BN of the last stage, not just the branch-closing ones
    nbn_scale_weight_decay: bool = True  # apply weight decay to NBN's shared scalar
    classifier_bn: Literal["none", "affine", "plain"] = "none"  # BatchNorm1d on the logits
    # linear: W f + b; cosine: cosine_scale * cos(w_c, f), no bias (LDAM's NormedLinear at scale 1, where the
    # ldam loss applies its own scale; with other losses a scale of ~16-30 lets the softmax become confident)
    classifier: Literal["linear", "cosine"] = "linear"
    cosine_scale: float = Field(1.0, gt=0)

class Stage1Config(StrictModel):
    """Backbone + classifier with plain loss and tuned weight decay (paper: 200 epochs, batch 64)."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)  # peak learning rate, set per step by lr_schedule
    lr_schedule: Literal["cosine", "step"] = "cosine"  # cosine to 0, or x lr_gamma at each of lr_milestones
    lr_milestones: list[int] = Field([160, 180], validate_default=True)  # epochs after which lr drops (step)
    lr_gamma: float = Field(0.01, gt=0, le=1)  # factor at each milestone, cumulative: lr, lr/1e2, lr/1e4
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-3, ge=0)
    warmup_epochs: int = Field(0, ge=0)  # linear warm-up (per step) for either schedule
    loss: LossName = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # loss ce: the target gets 1 - eps + eps / C
    logit_adjust_tau: float = Field(1.0, ge=0)  # loss logit_adjusted: logits + tau * log(n_c / N)
    ldam_max_margin: float = Field(0.5, gt=0)  # loss ldam: margin of the rarest class (m_c ~ n_c^(-1/4))
    ldam_scale: float = Field(30.0, gt=0)  # loss ldam: logits (cosines) are multiplied by this
    # Deferred re-weighting: from this 0-based stage-1 epoch on (160 of 200 in LDAM-DRW) the loss weights each
    # class by its class-balanced weight (effective number, drw_beta); None: never. An epoch >= epochs never
    # starts. For ce, balanced_softmax, logit_adjusted and ldam (the cb_* losses are re-weighted throughout).
    drw_epoch: int | None = Field(None, ge=0)
    drw_beta: float = Field(0.9999, ge=0, lt=1)
    sampler: SamplerName = "instance"  # instance, class_balanced or sqrt (p_c ~ sqrt(n_c)), see data.SAMPLERS
    exempt_norm_bias_from_wd: bool = False

    @field_validator("lr_milestones")
    @classmethod
    def _milestones_within_epochs(cls, milestones: list[int], info: ValidationInfo) -> list[int]:
        epochs, schedule = info.data.get("epochs"), info.data.get("lr_schedule")
        if schedule != "step" or epochs is None:
            return milestones
        increasing = all(a < b for a, b in itertools.pairwise(milestones))
        if not increasing or (milestones and not 1 <= milestones[0] <= milestones[-1] <= epochs):
            raise ValueError(f"lr_milestones must be increasing epochs within 1..{epochs} (stage1.epochs)")
        return milestones

    @field_validator("drw_epoch")
    @classmethod
    def _drw_needs_an_unweighted_loss(cls, drw_epoch: int | None, info: ValidationInfo) -> int | None:
        loss = info.data.get("loss")
        if drw_epoch is not None and loss is not None and loss not in REWEIGHTABLE:
            raise ValueError(f"deferred re-weighting needs a loss without class weights ({', '.join(REWEIGHTABLE)}); "
                             f"stage1.loss {loss!r} is class-balanced from the start")
        return drw_epoch


class Stage2Config(StrictModel):
    """Classifier retraining on a frozen backbone: class-balanced loss + weight decay + MaxNorm."""

    enabled: bool = True
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    # retrain: the classifier (and logit BN) retrained; lws: learnable weight scaling (Kang et al. 2020), only a
    # per-class scale of the frozen stage-1 classifier's logits is learned (weight decay applies to the scales;
    # no MaxNorm). cRT is retrain with sampler class_balanced and loss ce.
    mode: Literal["retrain", "lws"] = "retrain"
    sampler: SamplerName = "instance"
    loss: LossName = "cb_softmax_bce"
    beta: float = Field(0.9999, ge=0, lt=1)  # class-balanced effective-number beta
    focal_gamma: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # as in stage1, for each loss of the same name
    logit_adjust_tau: float = Field(1.0, ge=0)
    ldam_max_margin: float = Field(0.5, gt=0)
    ldam_scale: float = Field(30.0, gt=0)
    maxnorm_thresh: float | None = Field(0.1, ge=0)  # relative MaxNorm threshold; None disables MaxNorm
    maxnorm_every: Literal["step", "epoch"] = "step"
    update_bn_stats: bool = False  # the paper's code keeps BN in train mode during stage 2


class PosthocConfig(StrictModel):
    """Post-hoc tau-normalisation of the classifier, evaluated at every epoch at no training cost."""

    tau: float = Field(1.0, ge=0)


class TrainerConfig(StrictModel):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CPUs with bf16 instructions, else fp32; on CUDA bf16 autocast, or fp16 AMP where the
    # GPU lacks bf16 (ltsearch.train.resolve_precision). fp16 needs CUDA. History rows record what ran.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    eval_batch_size: int = Field(512, ge=1)
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: leave torch's default
    # When the test split is evaluated (validation: every epoch). best: at epochs that improve the stage's best
    # validation accuracy and at each stage's last epoch (every epoch without a validation set); rungs: at the
    # global epochs of test_epochs (a search passes ASHA's rungs) and at each stage's last epoch, where the
    # stage's best epoch is evaluated from its kept model if it had none; epoch: every epoch (slower: 10,000
    # test images an epoch for CIFAR); auto: best, and rungs in a search. See ltsearch/train.py's docstring.
    test_every: Literal["auto", "best", "rungs", "epoch"] = "auto"
    test_epochs: list[int] | None = None  # global epochs (1-based) with test under `rungs`; None: none


class ExperimentConfig(StrictModel):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    posthoc: PosthocConfig = PosthocConfig()
    trainer: TrainerConfig = TrainerConfig()

    @field_validator("stage2")
    @classmethod
    def _lws_without_logit_bn(cls, stage2: Stage2Config, info: ValidationInfo) -> Stage2Config:
        model = info.data.get("model")
        if stage2.mode == "lws" and model is not None and model.classifier_bn != "none":
            raise ValueError(f"mode lws needs model.classifier_bn 'none', got {model.classifier_bn!r} (a BatchNorm "
                             "on the logits would undo the per-class scales LWS learns)")
        return stage2


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-4` and `1e3` as floats (YAML 1.1 needs a dot and a signed exponent).

    Integers are still resolved first (PyYAML tries resolvers in order), so `5` stays an int."""


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))

def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; errors name the file (and line for syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read file ({err.__class__.__name__}: {err})") from None
    try:
        raw = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:{where} YAML syntax error: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def parse_overrides(items: list[str], source: str = "--set") -> dict[str, Any]:
    """Parse `key.sub=value` strings; values are read as YAML scalars (`0.005`, `true`, `[1, 2]`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: expected key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.load(value, Loader=_SafeLoader)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: cannot parse the value of {key.strip()!r}: {value!r}") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str = "--set") -> dict[str, Any]:
    """Return a copy of the nested dict `raw` with dotted keys set; the section must be a known one."""
    sections = ExperimentConfig.model_fields
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(
                f"{source}: {dotted}: expected section.key with section one of {list(sections)}")
        section, key = parts
        fields = sections[section].annotation.model_fields
        if key not in fields:
            raise ConfigError(f"{source}: {dotted}: unknown key; {section} has {sorted(fields)}")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"{source}: {section}: expected a mapping")
        out[section][key] = value
    return out


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per problem: `source: key.path: what was expected (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] != "missing" and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def validate_config(raw: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment config file, with optional `key=value` overrides."""
    raw = apply_overrides(load_yaml(path), parse_overrides(overrides or []))
    return validate_config(raw, str(path))


def with_overrides(config: ExperimentConfig, values: dict[str, Any], source: str = "sampled") -> ExperimentConfig:
    """A new validated config from `config` with dotted keys replaced (the original is untouched)."""
    raw = apply_overrides(config.model_dump(), values, source)
    return validate_config(raw, source)


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
