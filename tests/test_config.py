"""Tests of ltsearch.config: YAML loading, overrides, validation messages, immutability, round trips."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from ltsearch.config import (
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_config,
    load_yaml,
    parse_overrides,
    with_overrides,
)
from ltsearch.losses import LOSSES
from ltsearch.models import MODELS


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and plain loading

def test_defaults_validate_and_match_the_documented_values():
    cfg = ExperimentConfig()
    assert ExperimentConfig.model_validate(cfg.model_dump()) == cfg
    assert cfg.data.dataset == "cifar100"
    assert cfg.data.imbalance_factor == 100.0
    assert cfg.model.name == "resnet32"
    assert cfg.stage1.epochs == 200 and cfg.stage1.batch_size == 64
    assert cfg.stage1.weight_decay == 5e-3 and cfg.stage1.loss == "ce"
    assert cfg.stage2.loss == "cb_softmax_bce" and cfg.stage2.beta == 0.9999
    assert cfg.stage2.maxnorm_thresh == 0.1
    assert cfg.posthoc.tau == 1.0
    assert cfg.stage1.lr_schedule == "cosine"  # the step schedule's keys are inert by default
    assert cfg.stage1.lr_milestones == [160, 180] and cfg.stage1.lr_gamma == 0.01


def test_load_config_reads_a_yaml_file(tmp_path):
    path = write(tmp_path, """
data:
  dataset: cifar10
  imbalance_factor: 50
model:
  name: resnet8
  nbn: true
stage1:
  epochs: 3
  lr: 0.05
stage2:
  enabled: false
  maxnorm_thresh: null
""")
    cfg = load_config(path)
    assert cfg.data.dataset == "cifar10"
    assert cfg.data.imbalance_factor == 50.0 and isinstance(cfg.data.imbalance_factor, float)
    assert cfg.model.name == "resnet8" and cfg.model.nbn is True
    assert cfg.stage1.epochs == 3 and cfg.stage1.lr == 0.05
    assert cfg.stage2.enabled is False and cfg.stage2.maxnorm_thresh is None
    # untouched keys keep their defaults
    assert cfg.stage1.batch_size == 64
    assert cfg.trainer == ExperimentConfig().trainer


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == ExperimentConfig()


# ---------------------------------------------------------------- numbers in YAML

@pytest.mark.parametrize("text, value", [
    ("5e-4", 5e-4), ("1e-3", 1e-3), ("1.0e-4", 1e-4), ("-2e+3", -2000.0), ("1e3", 1000.0), ("0.005", 0.005),
    ("+3E2", 300.0),
])
def test_exponent_notation_loads_as_float(tmp_path, text, value):
    raw = load_yaml(write(tmp_path, f"x: {text}\n"))
    assert type(raw["x"]) is float
    assert raw["x"] == value


@pytest.mark.parametrize("text, value", [("5", 5), ("-7", -7), ("0", 0), ("+12", 12), ("1000", 1000)])
def test_integers_stay_integers(tmp_path, text, value):
    raw = load_yaml(write(tmp_path, f"x: {text}\n"))
    assert type(raw["x"]) is int
    assert raw["x"] == value


def test_strings_and_booleans_are_not_turned_into_numbers(tmp_path):
    raw = load_yaml(write(tmp_path, "a: abc\nb: true\nc: '5e-4'\nd: 1e\ne: null\n"))
    assert raw == {"a": "abc", "b": True, "c": "5e-4", "d": "1e", "e": None}


def test_exponent_weight_decay_reaches_the_config(tmp_path):
    cfg = load_config(write(tmp_path, "stage1:\n  weight_decay: 5e-4\nstage2:\n  weight_decay: 1e-1\n"))
    assert cfg.stage1.weight_decay == 5e-4
    assert cfg.stage2.weight_decay == 0.1


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
def test_yaml_inf_and_nan_load_as_floats(tmp_path, text):
    value = load_yaml(write(tmp_path, f"x: {text}\n"))["x"]
    assert isinstance(value, float)
    assert math.isinf(value) if "inf" in text else math.isnan(value)


def test_explicit_float_tag_gives_a_float(tmp_path):
    value = load_yaml(write(tmp_path, "x: !!float 5\n"))["x"]
    assert type(value) is float and value == 5.0


# ---------------------------------------------------------------- overrides

def test_set_override_replaces_one_key(tmp_path):
    path = write(tmp_path, "stage1:\n  weight_decay: 0.1\n  epochs: 7\n")
    cfg = load_config(path, ["stage1.weight_decay=0.005"])
    assert cfg.stage1.weight_decay == 0.005
    assert cfg.stage1.epochs == 7  # the rest of the section is kept


def test_overrides_parse_yaml_scalars_and_create_missing_sections(tmp_path):
    path = write(tmp_path, "")
    cfg = load_config(path, ["model.nbn=true", "stage2.maxnorm_thresh=null", "stage1.lr=1e-2",
                             "trainer.seed = 3", "model.name=resnet8"])
    assert cfg.model.nbn is True
    assert cfg.stage2.maxnorm_thresh is None
    assert cfg.stage1.lr == 0.01
    assert cfg.trainer.seed == 3
    assert cfg.model.name == "resnet8"


def test_parse_overrides_types():
    out = parse_overrides(["a.b=5e-4", "a.c=3", "a.d=x=y", "a.e=[1, 2]"])
    assert out == {"a.b": 5e-4, "a.c": 3, "a.d": "x=y", "a.e": [1, 2]}
    assert type(out["a.b"]) is float and type(out["a.c"]) is int


@pytest.mark.parametrize("item, needle", [
    ("nosection.x=1", "nosection.x"),
    ("stage1.nokey=1", "stage1.nokey"),
    ("novalue", "novalue"),
    ("=1", "=1"),
    ("stage1=1", "stage1"),
    ("stage1.lr.extra=1", "stage1.lr.extra"),
])
def test_bad_override_raises_config_error_naming_the_key(tmp_path, item, needle):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_config(path, [item])
    assert needle in str(info.value)


def test_unknown_override_key_lists_the_section_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(write(tmp_path, ""), ["stage1.nokey=1"])
    assert "weight_decay" in str(info.value)


def test_override_value_is_validated(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["stage1.weight_decay=-1"])
    msg = str(info.value)
    assert "stage1.weight_decay" in msg and str(path) in msg


# ---------------------------------------------------------------- validation errors

@pytest.mark.parametrize("text, key", [
    ("bogus: 1\n", "bogus"),
    ("stage1:\n  bogus: 1\n", "stage1.bogus"),
    ("model:\n  name: resnet8\n  nbn_typo: true\n", "model.nbn_typo"),
    ("trainer:\n  seed: 1\n  devise: cpu\n", "trainer.devise"),
])
def test_unknown_keys_are_rejected_at_every_level(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}: {key}: unknown key" in msg


@pytest.mark.parametrize("text, key", [
    ("stage1:\n  weight_decay: abc\n", "stage1.weight_decay"),
    ("stage1:\n  epochs: 1.5\n", "stage1.epochs"),
    ("stage1:\n  weight_decay: -0.1\n", "stage1.weight_decay"),
    ("stage2:\n  beta: 1.0\n", "stage2.beta"),
    ("data:\n  dataset: imagenet\n", "data.dataset"),
    ("stage1: 5\n", "stage1"),
])
def test_wrong_values_name_the_file_and_dotted_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: ")
    assert "\n" not in msg


def test_wrong_type_message_shows_the_bad_value(tmp_path):
    path = write(tmp_path, "stage1:\n  weight_decay: abc\n")
    with pytest.raises(ConfigError, match=r"\(got 'abc'\)"):
        load_config(path)


def test_several_problems_are_all_reported(tmp_path):
    path = write(tmp_path, "stage1:\n  weight_decay: abc\n  epochs: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "stage1.weight_decay" in msg and "stage1.epochs" in msg


def test_unknown_model_name_lists_the_models(tmp_path):
    path = write(tmp_path, "model:\n  name: resnet9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "model.name" in msg and "resnet9000" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("section", ["stage1", "stage2"])
def test_unknown_loss_name_lists_the_losses(tmp_path, section):
    path = write(tmp_path, f"{section}:\n  loss: hinge\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{section}.loss" in msg and "hinge" in msg
    for name in LOSSES:
        assert name in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, "stage1:\n  epochs: 3\n  lr: [0.1\nstage2:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "YAML syntax error" in msg
    assert "line 4" in msg


def test_yaml_syntax_error_on_first_line(tmp_path):
    path = write(tmp_path, "stage1: {epochs: 3\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path)


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="expected a mapping") as info:
        load_config(path)
    assert str(path) in str(info.value) and kind in str(info.value)


# ---------------------------------------------------------------- immutability, with_overrides, dump

def test_config_is_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(ValidationError):
        cfg.stage1.weight_decay = 1.0
    with pytest.raises(ValidationError):
        cfg.stage1 = cfg.stage2
    assert cfg.stage1.weight_decay == 5e-3


def test_with_overrides_returns_a_new_config_and_keeps_the_original():
    cfg = ExperimentConfig()
    before = cfg.model_dump()
    new = with_overrides(cfg, {"stage1.weight_decay": 0.02, "model.nbn": True})
    assert new is not cfg
    assert new.stage1.weight_decay == 0.02 and new.model.nbn is True
    assert new.stage1.epochs == cfg.stage1.epochs
    assert cfg.model_dump() == before
    assert cfg.stage1.weight_decay == 5e-3 and cfg.model.nbn is False


def test_with_overrides_validates_and_names_the_source():
    with pytest.raises(ConfigError) as info:
        with_overrides(ExperimentConfig(), {"stage1.epochs": 0}, source="trial 3")
    assert str(info.value).startswith("trial 3: stage1.epochs: ")
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(ExperimentConfig(), {"stage1.nokey": 1})


def test_dump_then_load_roundtrips(tmp_path):
    cfg = with_overrides(ExperimentConfig(), {
        "data.dataset": "cifar10", "data.n_max": 300, "model.name": "resnet8", "model.nbn": True,
        "stage1.weight_decay": 1e-5, "stage1.lr": 0.123456789, "stage2.maxnorm_thresh": None,
        "stage2.loss": "cb_focal", "posthoc.tau": 0.5, "trainer.num_threads": 2,
    })
    path = tmp_path / "dumped.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.stage1.weight_decay == 1e-5


def test_default_dump_roundtrips(tmp_path):
    path = tmp_path / "d.yaml"
    dump_config(ExperimentConfig(), path)
    assert load_config(path) == ExperimentConfig()


# ---------------------------------------------------------------- stage-1 learning-rate schedule

def test_step_schedule_loads_with_its_milestones(tmp_path):
    path = write(tmp_path, "stage1:\n  epochs: 200\n  lr_schedule: step\n  lr_milestones: [160, 180]\n"
                           "  lr_gamma: 0.1\n  warmup_epochs: 5\n")
    cfg = load_config(path)
    assert cfg.stage1.lr_schedule == "step" and cfg.stage1.lr_milestones == [160, 180]
    assert cfg.stage1.lr_gamma == 0.1 and cfg.stage1.warmup_epochs == 5


@pytest.mark.parametrize("milestones", ["[180, 160]", "[160, 160]", "[0, 100]", "[100, 201]"])
def test_step_milestones_must_be_increasing_epochs_within_the_stage(tmp_path, milestones):
    path = write(tmp_path, f"stage1:\n  epochs: 200\n  lr_schedule: step\n  lr_milestones: {milestones}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: stage1.lr_milestones: ") and "within 1..200" in msg and "\n" not in msg


def test_default_milestones_are_checked_against_the_epochs_of_a_step_schedule():
    with pytest.raises(ConfigError, match=r"stage1.lr_milestones: .*within 1..100 .*\(got \[160, 180\]\)"):
        with_overrides(ExperimentConfig(), {"stage1.lr_schedule": "step", "stage1.epochs": 100})
    # the cosine schedule ignores the milestones, so a short cosine run needs no change to them
    assert with_overrides(ExperimentConfig(), {"stage1.epochs": 4}).stage1.lr_milestones == [160, 180]


@pytest.mark.parametrize("gamma", [0, -0.1, 1.5])
def test_lr_gamma_is_a_decay_factor(gamma):
    with pytest.raises(ConfigError, match="stage1.lr_gamma"):
        with_overrides(ExperimentConfig(), {"stage1.lr_gamma": gamma})


def test_lr_schedule_is_cosine_or_step():
    with pytest.raises(ConfigError, match="stage1.lr_schedule"):
        with_overrides(ExperimentConfig(), {"stage1.lr_schedule": "linear"})


# ---------------------------------------------------------------- long-tail method keys

def test_method_keys_default_to_the_plain_recipe():
    cfg = ExperimentConfig()
    assert cfg.model.classifier == "linear" and cfg.model.cosine_scale == 1.0
    for stage in (cfg.stage1, cfg.stage2):
        assert stage.sampler == "instance" and stage.label_smoothing == 0.0 and stage.logit_adjust_tau == 1.0
        assert stage.ldam_max_margin == 0.5 and stage.ldam_scale == 30.0  # LDAM-DRW's max_m and s
    assert cfg.stage1.drw_epoch is None and cfg.stage1.drw_beta == 0.9999
    assert cfg.stage2.mode == "retrain"


def test_method_keys_load_from_yaml(tmp_path):
    path = write(tmp_path, "model: {classifier: cosine}\n"
                           "stage1: {loss: ldam, drw_epoch: 160, sampler: sqrt, ldam_scale: 20}\n"
                           "stage2: {mode: lws, sampler: class_balanced, loss: ce, label_smoothing: 0.1}\n")
    cfg = load_config(path)
    assert (cfg.model.classifier, cfg.stage1.loss, cfg.stage1.drw_epoch) == ("cosine", "ldam", 160)
    assert (cfg.stage1.sampler, cfg.stage1.ldam_scale) == ("sqrt", 20.0)
    assert (cfg.stage2.mode, cfg.stage2.sampler, cfg.stage2.label_smoothing) == ("lws", "class_balanced", 0.1)


@pytest.mark.parametrize("text, key, needle", [
    ("model:\n  classifier: arcface\n", "model.classifier", "'linear' or 'cosine'"),
    ("model:\n  cosine_scale: 0\n", "model.cosine_scale", "greater than 0"),
    ("stage1:\n  sampler: balanced\n", "stage1.sampler", "class_balanced"),
    ("stage2:\n  sampler: balanced\n", "stage2.sampler", "sqrt"),
    ("stage2:\n  mode: crt\n", "stage2.mode", "'retrain' or 'lws'"),
    ("stage1:\n  label_smoothing: 1.0\n", "stage1.label_smoothing", "less than 1"),
    ("stage2:\n  logit_adjust_tau: -1\n", "stage2.logit_adjust_tau", "greater than or equal to 0"),
    ("stage1:\n  ldam_max_margin: 0\n", "stage1.ldam_max_margin", "greater than 0"),
    ("stage2:\n  ldam_scale: -30\n", "stage2.ldam_scale", "greater than 0"),
    ("stage1:\n  drw_epoch: -1\n", "stage1.drw_epoch", "greater than or equal to 0"),
    ("stage1:\n  drw_beta: 1.0\n", "stage1.drw_beta", "less than 1"),
    ("stage1:\n  loss: cb_ce\n  drw_epoch: 10\n", "stage1.drw_epoch", "'cb_ce' is class-balanced from the start"),
    ("model:\n  classifier_bn: affine\nstage2:\n  mode: lws\n", "stage2", "mode lws needs model.classifier_bn"),
])
def test_bad_method_values_name_the_key(tmp_path, text, key, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: ") and needle in msg and "\n" not in msg


def test_drw_epoch_accepts_every_reweightable_loss():
    for loss in ("ce", "balanced_softmax", "logit_adjusted", "ldam"):
        assert with_overrides(ExperimentConfig(), {"stage1.loss": loss, "stage1.drw_epoch": 3}).stage1.drw_epoch == 3
