"""Tests of ltsearch.space: search-space files, their validation messages and Optuna sampling."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial

from ltsearch.config import ConfigError, ExperimentConfig, load_config, load_yaml, with_overrides
from ltsearch.space import Distribution, SearchSpaceFile, load_search_space, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
# Every YAML file under search_spaces/, subfolders included: search spaces, and the experiment configs
# some studies keep beside them (a file without a `space` section).
YAML_FILES = sorted((REPO / "search_spaces").rglob("*.yaml"))
SPACE_FILES = [p for p in YAML_FILES if "space" in load_yaml(p)]
CONFIG_FILES = [p for p in YAML_FILES if p not in SPACE_FILES]

BASE = """\
base:
  data: {dataset: cifar10, imbalance_factor: 100}
  model: {name: resnet8}
  stage1: {epochs: 2, weight_decay: 5e-3}
  stage2: {epochs: 1}
"""

VALID = BASE + """\
space:
  stage1.weight_decay: {loguniform: [1.0e-4, 1.0e-1]}
  stage1.lr: {uniform: [0.01, 0.2]}
  stage2.weight_decay: {quniform: [0.0, 0.5, 0.05]}
  model.nbn: {choice: [false, true]}
  model.nbn_scale_weight_decay: {choice: [true, false], when: {model.nbn: true}}
  posthoc.tau: {uniform: [0, 2]}
search:
  num_samples: 4
  metric: tau_val_acc
  direction: max
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def flat(config: ExperimentConfig) -> dict:
    return {f"{section}.{key}": value for section, fields in config.model_dump().items()
            for key, value in fields.items()}


def expect_error(tmp_path: Path, text: str, *needles: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------- a valid file

def test_valid_file_loads_every_part(tmp_path):
    sp = load_search_space(write(tmp_path, VALID))
    assert isinstance(sp, SearchSpaceFile)
    assert sp.base.data.dataset == "cifar10" and sp.base.model.name == "resnet8"
    assert sp.base.stage1.epochs == 2 and sp.base.stage1.weight_decay == 5e-3
    assert list(sp.space) == ["stage1.weight_decay", "stage1.lr", "stage2.weight_decay", "model.nbn",
                              "model.nbn_scale_weight_decay", "posthoc.tau"]
    kinds = {key: dist.kind for key, dist in sp.space.items()}
    assert kinds == {"stage1.weight_decay": "loguniform", "stage1.lr": "uniform",
                     "stage2.weight_decay": "quniform", "model.nbn": "choice",
                     "model.nbn_scale_weight_decay": "choice", "posthoc.tau": "uniform"}
    assert sp.space["stage1.weight_decay"].loguniform == (1e-4, 0.1)
    assert sp.space["stage2.weight_decay"].quniform == (0.0, 0.5, 0.05)
    assert sp.space["model.nbn_scale_weight_decay"].when == {"model.nbn": True}
    assert sp.space["model.nbn"].when == {}
    assert sp.search.num_samples == 4 and sp.search.metrics == ["tau_val_acc"] and sp.search.directions == ["max"]
    assert sp.search.mode == "joint"


def test_search_section_is_optional(tmp_path):
    sp = load_search_space(write(tmp_path, BASE + "space:\n  stage1.lr: {uniform: [0.01, 0.2]}\n"))
    assert sp.search.num_samples == 8 and sp.search.metric == "val_acc"


def test_int_distribution_is_accepted_and_sampled(tmp_path):
    sp = load_search_space(write(tmp_path, BASE + "space:\n  stage1.epochs: {int: [1, 3]}\n"))
    assert sp.space["stage1.epochs"].int == (1, 3) and sp.space["stage1.epochs"].kind == "int"
    trial = FixedTrial({"stage1.epochs": 2})
    suggest(trial, sp.space, flat(sp.base))
    assert trial.params == {"stage1.epochs": 2}
    assert trial.distributions["stage1.epochs"] == IntDistribution(1, 3)


def test_int_distribution_rejects_fractional_bounds():
    with pytest.raises(ValueError):
        Distribution(int=[1.5, 3])


def test_overrides_and_num_samples(tmp_path):
    path = write(tmp_path, VALID)
    sp = load_search_space(path, overrides=["stage1.epochs=5", "search.metric=tau_val_acc_few"])
    assert sp.base.stage1.epochs == 5 and sp.search.metric == "tau_val_acc_few"
    assert load_search_space(path, num_samples=11).search.num_samples == 11
    with pytest.raises(ConfigError, match="stage1.nokey"):
        load_search_space(path, overrides=["stage1.nokey=1"])


# ---------------------------------------------------------------- errors

def test_missing_base_section(tmp_path):
    expect_error(tmp_path, "space:\n  posthoc.tau: {uniform: [0, 2]}\n", "base: missing section")


def test_missing_space_section(tmp_path):
    expect_error(tmp_path, BASE, "space: missing section")


def test_space_must_be_a_mapping(tmp_path):
    expect_error(tmp_path, BASE + "space: [1, 2]\n", "space: expected a mapping")


def test_unknown_top_level_key(tmp_path):
    expect_error(tmp_path, VALID + "extras: 1\n", "extras", "unknown top-level key")


def test_unknown_key_in_base(tmp_path):
    text = VALID.replace("model: {name: resnet8}", "model: {name: resnet8, nope: 1}")
    expect_error(tmp_path, text, "base.model.nope: unknown key")


def test_space_key_not_in_the_config(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage1.nope: {uniform: [0, 1]}\n", "space.stage1.nope",
                 "not a key of the experiment config")


def test_space_key_without_section(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  weight_decay: {uniform: [0, 1]}\n", "space.weight_decay")


def test_space_entry_must_be_a_mapping(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage1.lr: 0.1\n", "space.stage1.lr", "expected a mapping")


@pytest.mark.parametrize("entry, needle", [
    ("{loguniform: [0, 1]}", "> 0"),
    ("{loguniform: [-1.0e-3, 1]}", "> 0"),
    ("{uniform: [1, 0]}", "low < high"),
    ("{uniform: [0.5, 0.5]}", "low < high"),
    ("{quniform: [0.0, 1.0, 0]}", "step"),
    ("{choice: []}", "at least one"),
    ("{uniform: [0, 1], loguniform: [1.0e-3, 1]}", "exactly one"),
    ("{when: {model.nbn: true}}", "exactly one"),
    ("{normal: [0, 1]}", "unknown key"),
    ("{uniform: [0, 1, 2]}", "uniform"),
    ("{uniform: [0, 1e400]}", "low < high"),  # 1e400 reads as inf: not a finite range
])
def test_bad_distribution_names_the_key(tmp_path, entry, needle):
    text = BASE + f"space:\n  stage2.weight_decay: {entry}\n"
    expect_error(tmp_path, text, "space.stage2.weight_decay", needle)


def test_unknown_distribution_is_reported_as_its_dotted_key(tmp_path):
    msg = expect_error(tmp_path, BASE + "space:\n  stage2.weight_decay: {normal: [0, 1]}\n")
    assert "space.stage2.weight_decay.normal: unknown key" in msg


def test_choice_value_the_config_rejects(tmp_path):
    msg = expect_error(tmp_path, BASE + "space:\n  model.name: {choice: [resnet8, nonet]}\n",
                       "space.model.name", "nonet")
    assert "resnet32" in msg  # the list of known models


def test_choice_value_of_the_wrong_type(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage2.maxnorm_every: {choice: [step, batch]}\n",
                 "space.stage2.maxnorm_every", "batch")


def test_bound_the_config_rejects(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage1.weight_decay: {uniform: [-1, 1]}\n",
                 "space.stage1.weight_decay", "stage1.weight_decay", "-1")


def test_upper_bound_the_config_rejects(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage2.beta: {uniform: [0.9, 1.0]}\n", "space.stage2.beta")


def test_float_distribution_on_an_int_field_is_rejected(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage1.epochs: {uniform: [1, 10]}\n", "space.stage1.epochs")


def test_when_condition_on_an_unknown_key(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  posthoc.tau: {uniform: [0, 2], when: {model.nope: true}}\n",
                 "space.posthoc.tau.when.model.nope")


def test_test_set_metric_is_rejected(tmp_path):
    expect_error(tmp_path, VALID.replace("metric: tau_val_acc", "metric: test_acc"), "search.metric", "test_acc")


def test_test_set_metric_in_a_list_is_rejected(tmp_path):
    text = VALID.replace("metric: tau_val_acc", "metric: [tau_val_acc, test_acc_few]").replace(
        "direction: max", "direction: [max, max]")
    expect_error(tmp_path, text, "search.metric", "test_acc_few")


def test_direction_list_length_must_match_metrics(tmp_path):
    text = VALID.replace("metric: tau_val_acc", "metric: [tau_val_acc, val_acc_few]").replace(
        "direction: max", "direction: [max]")
    expect_error(tmp_path, text, "search", "direction has 1 entries for 2 metrics")


def test_multi_objective_settings(tmp_path):
    text = VALID.replace("metric: tau_val_acc", "metric: [tau_val_acc, train_loss]").replace(
        "direction: max", "direction: [max, min]")
    sp = load_search_space(write(tmp_path, text))
    assert sp.search.metrics == ["tau_val_acc", "train_loss"] and sp.search.directions == ["max", "min"]


def test_staged_mode_needs_stage2_or_posthoc_keys(tmp_path):
    text = BASE + "space:\n  stage1.lr: {uniform: [0.01, 0.1]}\nsearch: {mode: staged}\n"
    expect_error(tmp_path, text, "search.mode", "staged")


def test_unknown_key_in_search(tmp_path):
    expect_error(tmp_path, VALID + "  num_sample: 3\n", "search.num_sample", "unknown key")


def test_bad_value_in_search(tmp_path):
    expect_error(tmp_path, VALID + "  sampler: {type: grid}\n", "search.sampler.type")


def test_yaml_errors_pass_through(tmp_path):
    expect_error(tmp_path, "base: {model: [\n", "YAML syntax error", "line")
    with pytest.raises(ConfigError, match="file not found"):
        load_search_space(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- sampling

def test_suggest_with_fixed_trial_uses_the_declared_distributions(tmp_path):
    sp = load_search_space(write(tmp_path, VALID))
    params = {"stage1.weight_decay": 0.01, "stage1.lr": 0.05, "stage2.weight_decay": 0.15,
              "model.nbn": False, "posthoc.tau": 1.5}
    trial = FixedTrial(params)
    assert suggest(trial, sp.space, flat(sp.base)) is None
    assert trial.params == params  # nbn false: the conditioned key was never asked for
    assert trial.distributions["stage1.weight_decay"] == FloatDistribution(1e-4, 0.1, log=True)
    assert trial.distributions["stage1.lr"] == FloatDistribution(0.01, 0.2)
    assert trial.distributions["stage2.weight_decay"] == FloatDistribution(0.0, 0.5, step=0.05)
    assert trial.distributions["model.nbn"] == CategoricalDistribution([False, True])
    cfg = with_overrides(sp.base, trial.params)
    assert cfg.stage1.weight_decay == 0.01 and cfg.posthoc.tau == 1.5


def test_when_condition_holds_then_the_key_is_sampled(tmp_path):
    sp = load_search_space(write(tmp_path, VALID))
    params = {"stage1.weight_decay": 0.01, "stage1.lr": 0.05, "stage2.weight_decay": 0.15,
              "model.nbn": True, "model.nbn_scale_weight_decay": False, "posthoc.tau": 1.5}
    trial = FixedTrial(params)
    suggest(trial, sp.space, flat(sp.base))
    assert trial.params == params
    assert trial.distributions["model.nbn_scale_weight_decay"] == CategoricalDistribution([True, False])


def test_when_condition_on_a_base_value(tmp_path):
    text = BASE + "space:\n  stage1.lr: {uniform: [0.01, 0.2], when: {model.name: resnet8}}\n"
    sp = load_search_space(write(tmp_path, text))
    trial = FixedTrial({"stage1.lr": 0.05})
    suggest(trial, sp.space, flat(sp.base))
    assert trial.params == {"stage1.lr": 0.05}
    other = with_overrides(sp.base, {"model.name": "resnet20"})
    trial = FixedTrial({"stage1.lr": 0.05})
    suggest(trial, sp.space, flat(other))
    assert trial.params == {}


def test_study_samples_within_bounds_and_honours_when(tmp_path):
    sp = load_search_space(write(tmp_path, VALID))
    base = flat(sp.base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: suggest(trial, sp.space, base) or 0.0, n_trials=60)
    trials = study.trials
    assert len(trials) == 60
    seen_nbn = set()
    for t in trials:
        p = t.params
        assert 1e-4 <= p["stage1.weight_decay"] <= 0.1
        assert 0.01 <= p["stage1.lr"] <= 0.2
        assert 0.0 <= p["stage2.weight_decay"] <= 0.5
        assert p["stage2.weight_decay"] / 0.05 == pytest.approx(round(p["stage2.weight_decay"] / 0.05), abs=1e-6)
        assert 0.0 <= p["posthoc.tau"] <= 2.0
        assert p["model.nbn"] in (False, True)
        seen_nbn.add(p["model.nbn"])
        assert ("model.nbn_scale_weight_decay" in p) == p["model.nbn"]
        if p["model.nbn"]:
            assert p["model.nbn_scale_weight_decay"] in (True, False)
        # every sampled point is a valid experiment config
        cfg = with_overrides(sp.base, p)
        assert cfg.stage1.weight_decay == p["stage1.weight_decay"]
    assert seen_nbn == {False, True}
    # log-uniform: about 2/3 of the samples fall below 1e-2 in log space, under 1/10 in linear space
    below = sum(t.params["stage1.weight_decay"] < 1e-2 for t in trials)
    assert below >= 25
    assert trials[0].distributions["stage1.weight_decay"].log is True
    logs = [math.log10(t.params["stage1.weight_decay"]) for t in trials]
    assert min(logs) < -3.0 and max(logs) > -1.5


def test_sample_keys_by_phase(tmp_path):
    text = VALID.replace("direction: max", "direction: max\n  mode: staged")
    sp = load_search_space(write(tmp_path, text))
    assert sp.search.mode == "staged"
    assert sp.sample_keys("stage2") == ["stage2.weight_decay", "posthoc.tau"]
    assert sp.sample_keys("stage1") == ["stage1.weight_decay", "stage1.lr", "model.nbn",
                                        "model.nbn_scale_weight_decay"]
    assert sp.sample_keys() == list(sp.space) and len(sp.sample_keys("all")) == 6


def test_staged_mode_with_only_posthoc_keys_is_accepted(tmp_path):
    text = BASE + "space:\n  posthoc.tau: {uniform: [0, 2]}\nsearch: {mode: staged, metric: tau_val_acc}\n"
    sp = load_search_space(write(tmp_path, text))
    assert sp.sample_keys("stage2") == ["posthoc.tau"] and sp.sample_keys("stage1") == []


# ---------------------------------------------------------------- the repository's search spaces

@pytest.mark.parametrize("path", SPACE_FILES or [pytest.param(None, marks=pytest.mark.skip(
    reason="search_spaces/ holds no *.yaml file"))], ids=lambda p: str(p.relative_to(REPO)) if p else "none")
def test_repository_search_space_validates(path):
    sp = load_search_space(path)
    assert sp.space
    for key in sp.space:
        section, _, field = key.partition(".")
        assert field in ExperimentConfig.model_fields[section].annotation.model_fields
    # a few random points of the space all give valid experiment configs
    base = flat(sp.base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: suggest(trial, sp.space, base) or 0.0, n_trials=10)
    for t in study.trials:
        with_overrides(sp.base, t.params, source=f"{path.name} trial {t.number}")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_experiment_config_validates(path):
    assert isinstance(load_config(path), ExperimentConfig)


# ---------------------------------------------------------------- every searched key can move the objective

def test_tau_cannot_be_searched_on_a_plain_metric(tmp_path):
    """Post-hoc tau changes only the tau_* metrics: on val_acc it is a dimension of pure noise."""
    text = BASE + "space:\n  posthoc.tau: {uniform: [0, 2]}\nsearch: {metric: val_acc}\n"
    msg = expect_error(tmp_path, text, "space.posthoc.tau", "val_acc", "tau_val_acc")
    assert msg.count("\n") == 0


def test_tau_counts_when_any_objective_is_a_tau_metric(tmp_path):
    text = BASE + "space:\n  posthoc.tau: {uniform: [0, 2]}\nsearch: {metric: [val_acc, tau_val_acc_few]}\n"
    assert load_search_space(write(tmp_path, text)).space["posthoc.tau"].uniform == (0, 2)


def test_stage2_key_with_stage2_disabled_is_refused(tmp_path):
    text = BASE.replace("stage2: {epochs: 1}", "stage2: {enabled: false}") + \
        "space:\n  stage2.weight_decay: {loguniform: [1.0e-3, 1.0]}\n"
    expect_error(tmp_path, text, "space.stage2.weight_decay", "stage2.enabled: true", "False")


def test_stage2_key_is_accepted_when_stage2_enabled_is_searched(tmp_path):
    text = BASE.replace("stage2: {epochs: 1}", "stage2: {enabled: false}") + \
        "space:\n  stage2.enabled: {choice: [false, true]}\n  stage2.weight_decay: {loguniform: [1.0e-3, 1.0]}\n"
    assert "stage2.weight_decay" in load_search_space(write(tmp_path, text)).space


def test_nbn_option_without_nbn_is_refused(tmp_path):
    text = BASE + "space:\n  model.nbn_all_bn: {choice: [false, true]}\n"
    expect_error(tmp_path, text, "space.model.nbn_all_bn", "model.nbn: true")
    text = BASE + "space:\n  model.nbn: {choice: [false, true]}\n" \
                  "  model.nbn_all_bn: {choice: [false, true], when: {model.nbn: false}}\n"
    expect_error(tmp_path, text, "space.model.nbn_all_bn", "model.nbn: true")


def test_loss_parameters_need_their_loss(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage2.focal_gamma: {uniform: [0, 2]}\n", "space.stage2.focal_gamma",
                 "cb_focal")
    text = BASE.replace("stage2: {epochs: 1}", "stage2: {epochs: 1, loss: ce}") + \
        "space:\n  stage2.beta: {choice: [0.9, 0.99]}\n"
    expect_error(tmp_path, text, "space.stage2.beta", "class-balanced")
    text = BASE + "space:\n  stage2.loss: {choice: [ce, cb_focal]}\n  stage2.focal_gamma: {uniform: [0, 2]}\n"
    assert "stage2.focal_gamma" in load_search_space(write(tmp_path, text)).space


def test_staged_mode_refuses_update_bn_stats(tmp_path):
    """Bug: staged mode silently ignored stage2.update_bn_stats (features are cached from a frozen backbone)."""
    text = BASE + "space:\n  stage2.update_bn_stats: {choice: [false, true]}\nsearch: {mode: staged}\n"
    expect_error(tmp_path, text, "stage2.update_bn_stats", "staged")
    text = BASE.replace("stage2: {epochs: 1}", "stage2: {epochs: 1, update_bn_stats: true}") + \
        "space:\n  stage2.weight_decay: {loguniform: [1.0e-3, 1.0]}\nsearch: {mode: staged}\n"
    expect_error(tmp_path, text, "stage2.update_bn_stats", "joint")


def test_validation_metric_without_a_validation_set_is_refused(tmp_path):
    text = BASE.replace("imbalance_factor: 100}", "imbalance_factor: 100, val_per_class: 0}") + \
        "space:\n  stage1.lr: {uniform: [0.01, 0.2]}\n"
    expect_error(tmp_path, text, "search.metric", "val_acc", "val_per_class is 0")
    text += "search: {metric: train_loss, direction: min}\n"
    assert load_search_space(write(tmp_path, text)).search.metrics == ["train_loss"]


def test_max_epochs_covers_the_longest_sampled_schedule(tmp_path):
    """Bug: with stage1.epochs searched, ASHA's max_t was the base schedule's length."""
    sp = load_search_space(write(tmp_path, BASE + "space:\n  stage1.epochs: {int: [1, 9]}\n"))
    assert sp.max_epochs() == 9 + 1 and sp.max_epochs("stage1") == 9
    text = BASE.replace("stage2: {epochs: 1}", "stage2: {enabled: false}") + \
        "space:\n  stage2.enabled: {choice: [false, true]}\n  stage2.epochs: {choice: [3, 5]}\n"
    assert load_search_space(write(tmp_path, text)).max_epochs() == 2 + 5
    assert load_search_space(write(tmp_path, VALID)).max_epochs() == 3


def test_step_schedule_parameters_need_the_step_schedule(tmp_path):
    expect_error(tmp_path, BASE + "space:\n  stage1.lr_gamma: {uniform: [0.01, 0.5]}\n", "space.stage1.lr_gamma",
                 "lr_schedule: step", "cosine")
    text = BASE.replace("stage1: {epochs: 2,", "stage1: {epochs: 2, lr_schedule: step, lr_milestones: [1],") + \
        "space:\n  stage1.lr_gamma: {uniform: [0.01, 0.5]}\n"
    assert "stage1.lr_gamma" in load_search_space(write(tmp_path, text)).space


@pytest.mark.parametrize("key, spec, needs", [
    ("stage1.label_smoothing", "{uniform: [0.0, 0.2]}", "stage1.loss: ce"),
    ("stage1.logit_adjust_tau", "{uniform: [0.5, 2.0]}", "stage1.loss: logit_adjusted"),
    ("stage1.ldam_max_margin", "{uniform: [0.3, 0.7]}", "stage1.loss: ldam"),
    ("stage1.ldam_scale", "{choice: [16, 30]}", "stage1.loss: ldam"),
    ("stage2.label_smoothing", "{uniform: [0.0, 0.2]}", "stage2.loss: ce"),
    ("stage2.logit_adjust_tau", "{uniform: [0.5, 2.0]}", "stage2.loss: logit_adjusted"),
    ("stage2.ldam_scale", "{choice: [16, 30]}", "stage2.loss: ldam"),
    ("stage1.drw_beta", "{choice: [0.999, 0.9999]}", "a stage1.drw_epoch"),
    ("model.cosine_scale", "{uniform: [8, 32]}", "model.classifier: cosine"),
])
def test_method_parameters_need_their_method(tmp_path, key, spec, needs):
    """Each new method key is refused when the method it parameterises is off whenever it is sampled, and
    accepted under a `when:` that switches the method on."""
    base = BASE.replace("stage1: {epochs: 2,", "stage1: {epochs: 2, loss: balanced_softmax,")  # no method's loss
    expect_error(tmp_path, base + f"space:\n  {key}: {spec}\n", f"space.{key}", needs)
    other, value = needs.removeprefix("a ").split(": ") if ": " in needs else (needs.removeprefix("a "), "1")
    text = base + f"space:\n  {key}: {{{spec[1:-1]}, when: {{{other}: {value}}}}}\n"
    assert key in load_search_space(write(tmp_path, text)).space


def test_lws_leaves_maxnorm_and_cosine_leaves_tau_nothing_to_change(tmp_path):
    lws = BASE.replace("stage2: {epochs: 1}", "stage2: {epochs: 1, mode: lws}")
    expect_error(tmp_path, lws + "space:\n  stage2.maxnorm_thresh: {uniform: [0, 1]}\n", "space.stage2.maxnorm_thresh",
                 "stage2.mode: retrain")
    text = BASE + "space:\n  stage2.mode: {choice: [retrain, lws]}\n  stage2.maxnorm_thresh: {uniform: [0, 1]}\n"
    assert "stage2.maxnorm_thresh" in load_search_space(write(tmp_path, text)).space
    cosine = BASE.replace("model: {name: resnet8}", "model: {name: resnet8, classifier: cosine}")
    expect_error(tmp_path, cosine + "space:\n  posthoc.tau: {uniform: [0, 2]}\nsearch: {metric: tau_val_acc}\n",
                 "space.posthoc.tau", "model.classifier: linear")


def test_a_key_sampled_only_under_when_keeps_its_base_value_where_the_condition_fails(tmp_path):
    """Bug: `model.classifier: {choice: [cosine], when: {stage1.loss: ldam}}` was taken to make every trial's
    classifier cosine, so posthoc.tau (which needs a linear one) was refused; every trial without LDAM keeps the
    base's linear classifier. methods_c10lt.yaml's space can search tau on a tau metric, with or without `when`."""
    methods = load_yaml(REPO / "search_spaces/methods_c10lt.yaml")
    for tau in ({"uniform": [0.0, 2.0]}, {"uniform": [0.0, 2.0], "when": {"model.classifier": "linear"}}):
        path = write(tmp_path, yaml.safe_dump({**methods, "space": {**methods["space"], "posthoc.tau": tau}}))
        spec = load_search_space(path, ["search.metric=tau_val_acc"])
        assert spec.space["posthoc.tau"].uniform == (0.0, 2.0)
    ldam_only = BASE + ("space:\n  stage1.loss: {choice: [ce, ldam]}\n"
                        "  model.classifier: {choice: [cosine], when: {stage1.loss: ldam}}\n")
    tau = "  posthoc.tau: {uniform: [0, 2]%s}\nsearch: {metric: tau_val_acc}\n"
    assert "posthoc.tau" in load_search_space(write(tmp_path, ldam_only + tau % "")).space
    # where the condition surely holds whenever the key is sampled, the base value is out of reach
    expect_error(tmp_path, ldam_only + tau % ", when: {stage1.loss: ldam}", "space.posthoc.tau",
                 "model.classifier: linear", "'cosine'")
    # and where it never holds, only the base value is: cosine_scale under ce never meets a cosine classifier
    expect_error(tmp_path, ldam_only + "  model.cosine_scale: {uniform: [8, 32], when: {stage1.loss: ce}}\n",
                 "space.model.cosine_scale", "model.classifier: cosine", "'linear'")


# ---------------------------------------------------------------- search.staged.stage1_run
def _stage1_run(tmp_path: Path) -> Path:
    """Where a `python -m ltsearch train --out` run would be: the run is read when the search starts, not here."""
    return tmp_path / "run"


def _given_stage1(run: Path, space: str, extra: str = "") -> str:
    return BASE + f"space:\n{space}\nsearch:\n  mode: staged\n  staged: {{stage1_run: {run}}}\n{extra}"


def test_stage1_run_with_stage2_keys_loads(tmp_path):
    run = _stage1_run(tmp_path)
    spec = load_search_space(write(tmp_path, _given_stage1(run, "  stage2.weight_decay: {uniform: [0, 1]}")))
    assert spec.search.staged.stage1_run == str(run)


def test_stage1_run_refuses_a_searched_stage1_key(tmp_path):
    text = _given_stage1(_stage1_run(tmp_path), "  stage2.weight_decay: {uniform: [0, 1]}\n"
                                                "  stage1.weight_decay: {loguniform: [1e-4, 1e-2]}")
    expect_error(tmp_path, text, "space.stage1.weight_decay", "only stage2.* and posthoc.* keys")


def test_stage1_run_needs_staged_mode(tmp_path):
    text = BASE + f"space:\n  stage2.weight_decay: {{uniform: [0, 1]}}\nsearch:\n  staged: {{stage1_run: {tmp_path}}}\n"
    expect_error(tmp_path, text, "search.staged.stage1_run", "needs search.mode: staged")


def test_stage1_run_refuses_confirmation(tmp_path):
    text = _given_stage1(_stage1_run(tmp_path), "  stage2.weight_decay: {uniform: [0, 1]}",
                         "  confirm: {seeds: [1]}\n")
    expect_error(tmp_path, text, "search.confirm", "stage1_run fixes")

