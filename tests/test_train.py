"""The two-stage trainer on small synthetic CIFAR-10 folders (CPU, seconds), plus one end-to-end run on the
real CIFAR-10 copy (marked e2e)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ltsearch.__main__ import main
from ltsearch.build import load_data
from ltsearch.config import ExperimentConfig, with_overrides
from ltsearch.regularizers import relative_max_norm
from ltsearch.train import TrainingDiverged, resolve_precision, train


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


def checkpoint_after(config, epoch: int, dest: Path) -> Path:
    """Train `config`, interrupted right after `epoch` was reported; return a copy (`dest`) of the checkpoint
    that epoch reported, for a run to resume from."""
    class Interrupt(Exception):
        pass

    def stop(metrics, checkpoint):
        if metrics["epoch"] == epoch:
            shutil.copytree(checkpoint, dest)
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, report=stop)
    return dest


def small_config(root, **overrides) -> ExperimentConfig:
    base = ExperimentConfig.model_validate({
        "data": {"dataset": "cifar10", "root": str(root), "imbalance_factor": 10, "val_per_class": 5},
        "model": {"name": "resnet8"},
        "stage1": {"epochs": 2, "batch_size": 32, "lr": 0.05, "weight_decay": 5e-4},
        "stage2": {"epochs": 2, "batch_size": 32},
        "trainer": {"eval_batch_size": 64, "num_threads": 2},
    })
    return with_overrides(base, overrides)


def test_two_stages_report_every_epoch_with_monotonic_epoch(cifar10_root):
    config = small_config(cifar10_root)
    calls = []
    summary = train(config, report=lambda metrics, ckpt: calls.append((metrics, ckpt)))
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3, 4]
    assert [m["stage"] for m, _ in calls] == [1, 1, 2, 2]
    metrics = calls[-1][0]
    for key in ("val_acc", "test_acc", "val_acc_many", "test_acc_few", "tau_val_acc", "val_loss", "train_loss",
                "test_acc_head", "test_acc_tail"):
        assert key in metrics
    assert len(metrics["classifier_norms"]) == 10 and len(metrics["test_per_class_acc"]) == 10
    # Synthetic pool of 60 per class, IF 10: 60 ... 6, the head gives 5 to val (55); no many-shot class.
    assert summary["class_counts"][0] == 55 and metrics["val_acc_many"] is None
    assert all(ckpt is not None for _, ckpt in calls)
    assert summary["stage1"]["best_epoch"] in (1, 2) and summary["stage2"]["best_epoch"] in (3, 4)


def test_stage2_trains_only_the_classifier_and_respects_maxnorm(cifar10_root):
    config = small_config(cifar10_root, **{"stage2.maxnorm_thresh": 0.0, "stage2.weight_decay": 0.0})
    states = []
    train(config, report=lambda m, ckpt: states.append(torch.load(f"{ckpt}/state.pt", weights_only=False)))
    stage1_best = states[1]["best"][1]["model"]
    final = states[-1]["model"]
    backbone_keys = [k for k in final if k.startswith("features.") and "num_batches" not in k]
    assert all(torch.equal(final[k], stage1_best[k]) for k in backbone_keys)  # frozen, BN stats included
    assert not torch.equal(final["classifier.weight"], stage1_best["classifier.weight"])
    # thresh 0: every row is capped at the smallest stage-1 row norm.
    cap = stage1_best["classifier.weight"].norm(dim=1).min()
    assert final["classifier.weight"].norm(dim=1).max() <= cap + 1e-5


def test_deterministic_on_cpu(cifar10_root):
    config = small_config(cifar10_root, **{"stage2.enabled": False})
    a, b = train(config), train(config)
    assert timeless(a["history"]) == timeless(b["history"])


def test_resume_mid_stage_matches_uninterrupted_run(cifar10_root, tmp_path):
    config = small_config(cifar10_root, **{"stage1.epochs": 3, "stage2.epochs": 2})
    full = train(config)
    resumed = train(config, resume_from=checkpoint_after(config, 2, tmp_path / "ckpt"))
    assert timeless(resumed["history"]) == timeless(full["history"])


def test_test_set_never_influences_selection(cifar10_root):
    """Scrambling the test labels changes test metrics but not one selection or one weight."""
    config = small_config(cifar10_root, **{"stage1.epochs": 3, "stage2.epochs": 1})
    data = load_data(config)
    scrambled = dataclasses.replace(data, test_y=data.test_y[torch.randperm(len(data.test_y),
                                                                            generator=torch.Generator().manual_seed(1))])
    a, b = train(config, data=data), train(config, data=scrambled)
    for stage in ("stage1", "stage2"):
        assert a[stage]["best_epoch"] == b[stage]["best_epoch"]
        assert a[stage]["best"]["val_acc"] == b[stage]["best"]["val_acc"]
        assert a[stage]["best"]["classifier_norms"] == b[stage]["best"]["classifier_norms"]
    assert a["stage1"]["best"]["test_acc"] != b["stage1"]["best"]["test_acc"]


def test_best_epoch_is_chosen_on_validation(cifar10_root):
    summary = train(small_config(cifar10_root, **{"stage1.epochs": 4, "stage2.enabled": False}))
    history = summary["history"]
    best = max(history, key=lambda h: h["val_acc"])  # max() keeps the first of equal values, as the trainer
    assert summary["stage1"]["best_epoch"] == best["epoch"]
    assert summary["stage1"]["best"]["test_acc"] == best["test_acc"]


def test_step_schedule_drops_the_stage1_lr_at_its_milestones(cifar10_root):
    config = small_config(cifar10_root, **{"stage1.epochs": 3, "stage2.enabled": False, "stage1.lr_schedule": "step",
                                           "stage1.lr_milestones": [1, 2], "stage1.lr_gamma": 0.1})
    history = train(config)["history"]
    # the last step of each epoch: 0.05 in epoch 1, x0.1 after epoch 1, x0.1 again after epoch 2
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.005, 0.0005])


def test_divergence_raises_a_clear_error(cifar10_root):
    config = small_config(cifar10_root, **{"stage1.lr": 1e12, "stage1.epochs": 1})
    with pytest.raises(TrainingDiverged, match="stage 1 epoch 1"):
        train(config)


def train_with_states(config: ExperimentConfig) -> tuple[dict, list[dict]]:
    """The summary and the checkpoint state of every epoch."""
    states = []
    summary = train(config, report=lambda m, ckpt: states.append(torch.load(f"{ckpt}/state.pt", weights_only=False)))
    return summary, states


def one_epoch_each(cifar10_root, **options) -> ExperimentConfig:
    return small_config(cifar10_root, **{"stage1.epochs": 1, "stage2.epochs": 1, **options})


@pytest.fixture(scope="module")
def plain_run(cifar10_root):
    """The variants' baseline: no NBN, fp32, one epoch of each stage."""
    return train_with_states(one_epoch_each(cifar10_root, **{"trainer.precision": "fp32"}))


def test_nbn_variant_trains_the_shared_scale(cifar10_root, plain_run):
    summary, states = train_with_states(one_epoch_each(cifar10_root, **{"model.nbn": True}))
    assert summary["stage2"]["final"]["train_loss"] > 0
    assert "nbn_scale.alpha" not in plain_run[1][-1]["model"]
    alpha = states[0]["model"]["nbn_scale.alpha"]  # after stage 1; initialised to 1
    assert alpha.dim() == 0 and alpha.item() != 1.0
    assert summary["stage1"]["final"]["train_loss"] != plain_run[0]["stage1"]["final"]["train_loss"]


def test_bf16_variant_differs_from_fp32_but_stays_close(cifar10_root, plain_run):
    summary, _ = train_with_states(one_epoch_each(cifar10_root, **{"trainer.precision": "bf16"}))
    assert summary["stage2"]["final"]["train_loss"] > 0
    plain = plain_run[0]
    for stage in ("stage1", "stage2"):
        bf16, fp32 = summary[stage]["final"]["train_loss"], plain[stage]["final"]["train_loss"]
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.1)
    assert summary["stage1"]["final"]["val_loss"] == pytest.approx(plain["stage1"]["final"]["val_loss"], rel=0.1)
    assert {h["precision"] for h in summary["history"]} == {"bf16"}
    assert {h["precision"] for h in plain["history"]} == {"fp32"}


def test_auto_precision_is_bf16_on_a_cpu_with_bf16_instructions_else_fp32(monkeypatch):
    cpu = torch.device("cpu")
    for capabilities, expected in [({"avx512_bf16": True, "amx_bf16": False}, "bf16"),
                                   ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),
                                   ({"avx512_bf16": False, "amx_bf16": False}, "fp32")]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert resolve_precision("auto", cpu) == expected, capabilities
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_cb_focal_variant_trains_the_logit_bn_with_its_own_loss(cifar10_root):
    options = {"model.classifier_bn": "affine", "stage2.loss": "cb_focal"}
    summary, states = train_with_states(one_epoch_each(cifar10_root, **options))
    assert summary["stage2"]["final"]["train_loss"] > 0
    ce, _ = train_with_states(one_epoch_each(cifar10_root, **{**options, "stage2.loss": "cb_ce"}))
    assert timeless(summary["history"])[0] == timeless(ce["history"])[0]  # the same stage 1
    assert summary["stage2"]["final"]["train_loss"] != ce["stage2"]["final"]["train_loss"]
    stage1, final = states[0]["model"], states[-1]["model"]
    assert not torch.equal(final["logit_bn.weight"], stage1["logit_bn.weight"])  # the logit BN is trained


@pytest.mark.parametrize("update_bn_stats", [True, False])
def test_update_bn_stats_variant_moves_only_the_bn_statistics(cifar10_root, update_bn_stats):
    summary, states = train_with_states(one_epoch_each(
        cifar10_root, **{"stage2.update_bn_stats": update_bn_stats, "stage2.maxnorm_every": "epoch"}))
    assert summary["stage2"]["final"]["train_loss"] > 0
    stage1, final = states[0]["model"], states[-1]["model"]
    stats = [k for k in final if k.startswith("features.") and k.endswith(("running_mean", "running_var"))]
    weights = [k for k in final if k.startswith("features.") and k.endswith(("weight", "bias"))]
    assert stats and weights
    assert all(torch.equal(final[k], stage1[k]) for k in weights)  # the backbone stays frozen
    assert any(not torch.equal(final[k], stage1[k]) for k in stats) == update_bn_stats
    # MaxNorm once per epoch: the classifier ends the epoch within the radius from the stage-1 norms
    radius = relative_max_norm(stage1["classifier.weight"], 0.1)
    assert max(summary["stage2"]["final"]["classifier_norms"]) <= radius + 1e-5


@pytest.mark.parametrize(("scale_wd", "exempt_norm_bias", "decayed"),
                         [(True, True, True), (True, False, True), (False, True, False), (False, False, False)])
def test_nbn_scale_is_decayed_iff_nbn_scale_weight_decay(cifar10_root, scale_wd, exempt_norm_bias, decayed):
    """Bug 10: `exempt_norm_bias_from_wd` used to exempt NBN's scale even with `nbn_scale_weight_decay`."""
    config = small_config(cifar10_root, **{
        "stage1.epochs": 1, "stage2.enabled": False, "model.nbn": True,
        "model.nbn_scale_weight_decay": scale_wd, "stage1.exempt_norm_bias_from_wd": exempt_norm_bias})
    _, states = train_with_states(config)
    optimizer = states[-1]["optimizer"]
    # NBN's scale is the model's only 0-dim parameter: find its group by the shape of its momentum buffer
    (group,) = [g for g in optimizer["param_groups"]
                if any(optimizer["state"][i]["momentum_buffer"].dim() == 0 for i in g["params"])]
    assert (group["weight_decay"] == config.stage1.weight_decay) == decayed
    assert (group["weight_decay"] == 0.0) == (not decayed)


def test_cli_writes_metrics_and_resolved_config(cifar10_root, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{dataset: cifar10, root: {cifar10_root}, imbalance_factor: 10, val_per_class: 5}}\n"
                   "model: {name: resnet8}\nstage1: {epochs: 1, batch_size: 32}\nstage2: {epochs: 1}\n")
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--set", "stage1.weight_decay=2e-3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage1"]["best"]["val_per_class_acc"] and metrics["class_counts"][0] == 55
    assert "weight_decay: 0.002" in (out / "config.yaml").read_text()
    assert (out / "checkpoint" / "state.pt").exists()


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage1: {weight_decay: lots}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage1.weight_decay" in err and str(cfg) in err


def test_cli_missing_dataset_names_the_path(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{dataset: cifar100, root: {tmp_path / 'nowhere'}}}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.e2e
def test_resnet8_on_real_cifar10_lt_beats_chance(real_cifar10_root):
    """Two epochs of ResNet-8 on real CIFAR-10-LT (IF 100, 12,386 train images): well above 10% chance."""
    config = ExperimentConfig.model_validate({
        "data": {"dataset": "cifar10", "root": str(real_cifar10_root), "imbalance_factor": 100},
        "model": {"name": "resnet8"},
        "stage1": {"epochs": 2, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
        "stage2": {"enabled": False},
    })
    summary = train(config)
    assert summary["num_train"] == 12386
    assert summary["stage1"]["best"]["test_acc"] > 20.0


# ---------------------------------------------------------------------------- lazy test evaluation


def _count_eval_passes(monkeypatch_context, passes: list[int]) -> None:
    """Record the number of images of every evaluation pass over an eval split (train=False loaders)."""
    from ltsearch.data import TensorLoader

    original = TensorLoader.__iter__

    def counted(self):
        if not self.train:
            passes.append(len(self.labels))
        return original(self)

    monkeypatch_context.setattr(TensorLoader, "__iter__", counted)


def _without_feature_reuse(monkeypatch_context, run_class) -> None:
    """Make the trainer compute stage 2's eval features every epoch, as it did before reusing them."""
    init = run_class.__init__

    def uncached(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.keep_features = False

    monkeypatch_context.setattr(run_class, "__init__", uncached)


@pytest.fixture(scope="module")
def lazy_and_eager(cifar10_root):
    """The same 4 + 3 epochs twice: `test_every: best` (the default), and `test_every: epoch` with stage 2's
    feature reuse switched off (the evaluation as it was before lazy evaluation); the eval passes of each."""
    from ltsearch import train as train_module

    config = small_config(cifar10_root, **{"stage1.epochs": 4, "stage2.epochs": 3})
    runs = {}
    for mode in ("best", "epoch"):
        passes: list[int] = []
        with pytest.MonkeyPatch.context() as mp:
            _count_eval_passes(mp, passes)
            if mode == "epoch":
                _without_feature_reuse(mp, train_module._Run)
            summary = train(with_overrides(config, {"trainer.test_every": mode}))
        runs[mode] = (summary, passes)
    return runs


def test_test_split_is_evaluated_at_new_best_val_epochs_and_stage_ends_only(lazy_and_eager):
    summary, _ = lazy_and_eager["best"]
    history, best_val = summary["history"], {}
    for h in history:
        last_of_stage = h["stage_epoch"] == (4 if h["stage"] == 1 else 3)
        improves = h["stage"] not in best_val or h["val_acc"] > best_val[h["stage"]]
        best_val[h["stage"]] = max(best_val.get(h["stage"], -1.0), h["val_acc"])
        assert h["has_test"] == (improves or last_of_stage), h["epoch"]
        test_keys = [k for k in h if k.startswith(("test_", "tau_test_"))]
        assert bool(test_keys) == h["has_test"]  # absent, never 0 or None, where not evaluated
        assert h["device"] == "cpu"
    skipped = [h["epoch"] for h in history if not h["has_test"]]
    assert skipped, "this schedule is meant to have epochs that do not improve validation"
    for stage in ("stage1", "stage2"):  # the selected and the last epoch of each stage carry test figures
        assert summary[stage]["best"]["test_acc"] is not None and summary[stage]["final"]["test_acc"] is not None
        assert summary[stage]["best"]["test_per_class_acc"]


def test_lazy_evaluation_reports_the_numbers_of_every_epoch_evaluation(lazy_and_eager):
    """Skipping test epochs changes no number: every lazily reported value equals the eager run's (training
    never depends on the test set), and stage 2's reused backbone features give the same metrics as a
    backbone pass per epoch."""
    lazy, eager = lazy_and_eager["best"][0], lazy_and_eager["epoch"][0]
    assert all(h["has_test"] for h in eager["history"])
    for a, b in zip(timeless(lazy["history"]), timeless(eager["history"]), strict=True):
        a.pop("has_test"), b.pop("has_test")
        assert a == {k: b[k] for k in a}
    for stage in ("stage1", "stage2"):
        assert lazy[stage]["best_epoch"] == eager[stage]["best_epoch"]
        assert lazy[stage]["best"]["test_per_class_acc"] == eager[stage]["best"]["test_per_class_acc"]


def test_lazy_evaluation_skips_test_passes_and_stage2_reuses_features(lazy_and_eager):
    (lazy, lazy_passes), (_, eager_passes) = lazy_and_eager["best"], lazy_and_eager["epoch"]
    val_images, test_images = 10 * 5, 10 * 20
    assert eager_passes.count(val_images) == eager_passes.count(test_images) == 7  # both, every epoch
    stage1_tests = sum(h["has_test"] for h in lazy["history"] if h["stage"] == 1)
    assert lazy_passes.count(test_images) == stage1_tests  # none in stage 2: the selected epoch's features
    assert lazy_passes.count(val_images) == 4  # val likewise: stage 2 reuses them too


def test_without_a_validation_set_test_is_evaluated_every_epoch(cifar10_root):
    summary = train(small_config(cifar10_root, **{"data.val_per_class": 0, "stage1.epochs": 3,
                                                  "stage2.enabled": False}))
    assert [h["has_test"] for h in summary["history"]] == [True, True, True]
    assert all("test_acc" in h and "val_acc" not in h for h in summary["history"])
    assert summary["stage1"]["best_epoch"] == 3


def test_a_trial_stopped_at_any_epoch_keeps_a_test_figure_at_its_best_epoch(lazy_and_eager):
    """ASHA can stop a trial after any epoch; its results.csv row must still have test figures where the
    report plots them: at the best-by-validation epoch (`best_test_*`) when the last epoch has none."""
    import pandas as pd

    from ltsearch.search.results import trial_row
    from ltsearch.space import SearchSettings

    frame = pd.DataFrame(lazy_and_eager["best"][0]["history"])
    settings = SearchSettings()
    for stop in range(1, len(frame) + 1):
        row = trial_row("t", {}, frame.iloc[:stop], None, settings, len(frame), "ASHA")
        best = frame.iloc[:stop].loc[frame["val_acc"].iloc[:stop].idxmax()]
        assert row["best_epoch"] == best["epoch"] and row["best_test_acc"] == best["test_acc"]
        assert not pd.isna(row["best_test_acc"])
        assert pd.isna(row["final_test_acc"]) == (not frame["has_test"].iloc[stop - 1])


@pytest.fixture(scope="module")
def at_rungs(cifar10_root, lazy_and_eager):
    """The same 4 + 3 epochs under `test_every: rungs`, at two rungs that miss both stages' best epochs (the
    eager run's), and the epoch of every test evaluation (a stage's best epoch evaluated at its end counts at
    that last epoch)."""
    from ltsearch import train as train_module

    eager = lazy_and_eager["epoch"][0]
    rungs = [e for e in (2, 3, 5, 6) if e not in (eager["stage1"]["best_epoch"], eager["stage2"]["best_epoch"])][:2]
    config = small_config(cifar10_root, **{"stage1.epochs": 4, "stage2.epochs": 3, "trainer.test_every": "rungs",
                                           "trainer.test_epochs": rungs})
    tested: list[int] = []
    evaluate = train_module._Run.evaluate

    def recorded(self, stage, splits, tau):
        splits = list(splits)
        if "test" in splits:
            tested.append(len(self.history) + 1)
        return evaluate(self, stage, splits, tau)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module._Run, "evaluate", recorded)
        summary = train(config)
    return summary, rungs, tested


def test_rungs_evaluate_test_at_the_rungs_the_stage_ends_and_an_untested_best_epoch(at_rungs):
    summary, rungs, tested = at_rungs
    last = {1: 4, 2: 7}
    best = {s: summary[f"stage{s}"]["best_epoch"] for s in (1, 2)}
    recomputed = [s for s in (1, 2) if best[s] not in (*rungs, last[s])]
    assert recomputed, "the rungs miss the best epochs; this schedule has a stage whose best epoch is not its last"
    for h in summary["history"]:
        assert h["has_test"] == (h["epoch"] in rungs or h["epoch"] in last.values()), h["epoch"]
        assert bool([k for k in h if k.startswith(("test_", "tau_test_"))]) == h["has_test"]
        assert h["best_epoch"] == max((g for g in summary["history"] if g["stage"] == h["stage"]
                                       and g["epoch"] <= h["epoch"]), key=lambda g: (g["val_acc"], -g["epoch"]))["epoch"]
        carried = [k for k in h if k.startswith(("best_test_", "best_tau_test_"))]
        assert bool(carried) == (h["epoch"] == last[h["stage"]] and h["stage"] in recomputed), h["epoch"]
    assert tested == sorted([e for e in range(1, 8) if e in rungs or e in last.values()]
                            + [last[s] for s in recomputed])


def test_rungs_give_the_selected_epochs_the_test_figures_of_every_epoch_evaluation(at_rungs, lazy_and_eager):
    """Same seed, same training: every selected (best-by-validation) epoch carries exactly the test figures
    `test_every: epoch` reported for it, in the summary, in the stage's last result and in the results row."""
    import pandas as pd

    from ltsearch.search.results import trial_row
    from ltsearch.space import SearchSettings

    (summary, rungs, _), eager = at_rungs, lazy_and_eager["epoch"][0]

    def test_of(metrics):
        return {k: v for k, v in metrics.items() if k.startswith(("test_", "tau_test_"))}

    for a, b in zip(summary["history"], eager["history"], strict=True):
        assert {k: a[k] for k in a if k.startswith("val_")} == {k: b[k] for k in a if k.startswith("val_")}
    for stage, last in (("stage1", 4), ("stage2", 7)):
        best, reference = summary[stage]["best"], eager[stage]["best"]
        assert summary[stage]["best_epoch"] == eager[stage]["best_epoch"]
        assert test_of(best) == test_of(reference) and best["test_per_class_acc"]
        assert best.get("recomputed_test", False) == (best["epoch"] not in (*rungs, last))
        if best.get("recomputed_test"):
            carried = summary["history"][last - 1]
            assert carried["best_epoch"] == best["epoch"]
            assert {k: carried[f"best_{k}"] for k, v in test_of(reference).items() if not isinstance(v, list)} \
                == {k: v for k, v in test_of(reference).items() if not isinstance(v, list)}
    row = trial_row("t", {}, pd.DataFrame(summary["history"]), None, SearchSettings(), 7, "ASHA")
    chosen = next(h for h in eager["history"] if h["epoch"] == row["best_epoch"])
    for column in ("test_acc", "test_acc_tail", "tau_test_acc", "tau_test_acc_head"):
        assert row[f"best_{column}"] == chosen[column]


def test_a_checkpoint_of_a_run_stopped_in_stage2_gets_every_best_epochs_test_figures(cifar10_root,
                                                                                      lazy_and_eager):
    """Stopped at epoch 6 (stage 2's second of 3) without rungs: stage 1's best epoch was evaluated at its
    stage's end, stage 2's best so far never; `test_best_epochs` computes it from the kept model, with the
    figures `test_every: epoch` reported at that epoch, and attaches it to the state."""
    from ltsearch.train import test_best_epochs

    class Stopped(Exception):
        pass

    states = []

    def report(metrics, folder):
        states.append(torch.load(f"{folder}/state.pt", weights_only=False))
        if metrics["epoch"] == 6:
            raise Stopped

    config = small_config(cifar10_root, **{"stage1.epochs": 4, "stage2.epochs": 3, "trainer.test_every": "rungs"})
    with pytest.raises(Stopped):
        train(config, report=report)
    state, eager = states[-1], {h["epoch"]: h for h in lazy_and_eager["epoch"][0]["history"]}
    stage2_best = state["best"][2]["metrics"]
    assert state["best"][1]["metrics"]["has_test"] and not stage2_best["has_test"]
    figures = test_best_epochs(config, state)
    assert set(figures) == {state["best"][1]["metrics"]["epoch"], stage2_best["epoch"]}
    for epoch, test in figures.items():
        assert (test["test_acc"], test["tau_test_acc_tail"]) == (eager[epoch]["test_acc"], eager[epoch]["tau_test_acc_tail"])
    assert stage2_best["recomputed_test"] and stage2_best["has_test"] and len(stage2_best["test_per_class_acc"]) == 10


# ---------------------------------------------------------------------------- long-tail methods


def test_drw_switches_the_stage1_weights_at_its_epoch(cifar10_root, monkeypatch):
    """drw_epoch 2 of 3: the loss is unweighted in epochs 1-2 (0-based 0-1) and class-balanced in epoch 3."""
    from ltsearch.losses import DeferredReweighting

    calls = []
    forward = DeferredReweighting.forward

    def recording(self, logits, target):
        calls.append(self.active)
        return forward(self, logits, target)

    monkeypatch.setattr(DeferredReweighting, "forward", recording)
    config = small_config(cifar10_root, **{"stage1.epochs": 3, "stage2.enabled": False, "stage1.drw_epoch": 2})
    steps = math.ceil(sum(load_data(config).class_counts) / config.stage1.batch_size)
    train(config)
    assert calls == [False] * (2 * steps) + [True] * steps


def test_resume_with_drw_resampling_and_lws_matches_uninterrupted_run(cifar10_root, tmp_path):
    """Interrupted after stage-1 epoch 2 (DRW from epoch 1 on, class-balanced sampling) and again after stage-2
    epoch 1 (LWS, square-root sampling): each resumed run repeats the uninterrupted history exactly."""
    config = small_config(cifar10_root, **{
        "stage1.epochs": 3, "stage1.drw_epoch": 1, "stage1.sampler": "class_balanced", "stage1.loss": "ldam",
        "model.classifier": "cosine", "stage2.epochs": 2, "stage2.mode": "lws", "stage2.sampler": "sqrt",
        "stage2.loss": "ce"})
    full = train(config)
    for stop_at in (2, 4):
        resumed = train(config, resume_from=checkpoint_after(config, stop_at, tmp_path / f"ckpt{stop_at}"))
        assert timeless(resumed["history"]) == timeless(full["history"])


def test_lws_stage2_learns_only_the_class_scales(cifar10_root):
    summary, states = train_with_states(one_epoch_each(
        cifar10_root, **{"stage2.mode": "lws", "stage2.loss": "ce", "stage2.sampler": "class_balanced"}))
    stage1_best, final = states[0]["best"][1]["model"], states[-1]["model"]
    assert "logit_bn.scale" not in stage1_best and final["logit_bn.scale"].shape == (10,)
    assert not torch.equal(final["logit_bn.scale"], torch.ones(10))
    for key, value in stage1_best.items():  # the classifier and the backbone are the stage-1 ones
        assert torch.equal(final[key], value), key
    # the reported norms are those of the rows that classify, s_c * w_c: the frozen norms times |s_c|
    scaled = (final["classifier.weight"].norm(dim=1) * final["logit_bn.scale"].abs()).tolist()
    assert summary["stage2"]["final"]["classifier_norms"] == pytest.approx(scaled)
    assert scaled != pytest.approx(summary["stage1"]["best"]["classifier_norms"])


def test_each_stage_draws_its_epochs_with_its_own_sampler(cifar10_root, monkeypatch):
    from ltsearch import data

    drawn = []
    for name in ("class_balanced", "sqrt"):
        sampler = data.SAMPLERS[name]
        monkeypatch.setitem(data.SAMPLERS, name,
                            lambda labels, generator, name=name, sampler=sampler: drawn.append(name) or
                            sampler(labels, generator))
    train(small_config(cifar10_root, **{"stage1.sampler": "sqrt", "stage2.sampler": "class_balanced"}))
    assert drawn == ["sqrt", "sqrt", "class_balanced", "class_balanced"]  # 2 + 2 epochs


def test_ldam_drw_with_a_cosine_classifier_trains(cifar10_root):
    config = one_epoch_each(cifar10_root, **{
        "model.classifier": "cosine", "stage1.loss": "ldam", "stage1.drw_epoch": 0, "stage1.epochs": 2,
        "stage2.loss": "balanced_softmax"})
    summary, states = train_with_states(config)
    assert [h["train_loss"] > 0 for h in summary["history"]] == [True] * 3
    assert "classifier.bias" not in states[-1]["model"]  # the cosine classifier has no bias
    assert 0 <= summary["stage2"]["final"]["val_acc"] <= 100


def test_validation_predictions_are_kept_beside_each_checkpoint_and_survive_resume(cifar10_root, tmp_path):
    """Each checkpoint folder holds the per-image validation correctness of its epoch and of the stage's best
    epoch (the paired tie test's input); the counts are the reported accuracies; a run resumed after an
    interruption writes the same final predictions as the uninterrupted run (its best epoch's are restored
    from the checkpoint, not recomputed)."""
    import numpy as np

    from ltsearch.files import CHECKPOINT_FILE, PREDICTIONS_FILE
    from ltsearch.selection import unpack_correct

    config = small_config(cifar10_root, **{"stage1.epochs": 3, "stage2.enabled": False})
    images = 5 * 10  # val_per_class x classes
    seen = []

    def keep(metrics, ckpt):
        correct = unpack_correct(np.load(f"{ckpt}/{PREDICTIONS_FILE}"), images)
        seen.append((metrics, correct))

    full = train(config, report=keep)
    best_epoch = full["stage1"]["best_epoch"]
    for metrics, correct in seen:
        assert correct.shape == (2, 2, images)  # [epoch, best] x [classifier, tau-normalised] x images
        assert 100 * correct[0, 0].mean() == pytest.approx(metrics["val_acc"])
        assert 100 * correct[0, 1].mean() == pytest.approx(metrics["tau_val_acc"])
    assert (seen[-1][1][1] == seen[best_epoch - 1][1][0]).all()  # the best slot is the best epoch's

    checkpoint_after(config, 2, tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=False)
    assert state["best"][1]["val_correct"].shape == (2, images)
    train(config, resume_from=tmp_path / "ckpt", out_dir=tmp_path / "out")
    resumed = unpack_correct(np.load(tmp_path / "out" / "checkpoint" / PREDICTIONS_FILE), images)
    assert (resumed == seen[-1][1]).all()
