"""The two-stage trainer on small synthetic CIFAR-10 folders (CPU, seconds), plus one end-to-end run on the
real CIFAR-10 copy (marked e2e)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from ltsearch.__main__ import main
from ltsearch.config import ExperimentConfig, with_overrides
from ltsearch.data import load_data
from ltsearch.train import TrainingDiverged, train


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


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
    checkpoints = []

    class Interrupt(Exception):
        pass

    def stop_after_two(metrics, ckpt):
        if metrics["epoch"] == 2:
            checkpoints.append(shutil.copytree(ckpt, tmp_path / "ckpt"))
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, report=stop_after_two)
    resumed = train(config, resume_from=checkpoints[0])
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


def test_divergence_raises_a_clear_error(cifar10_root):
    config = small_config(cifar10_root, **{"stage1.lr": 1e12, "stage1.epochs": 1})
    with pytest.raises(TrainingDiverged, match="stage 1 epoch 1"):
        train(config)


@pytest.mark.parametrize("options", [{"model.nbn": True}, {"trainer.precision": "bf16"},
                                     {"model.classifier_bn": "affine", "stage2.loss": "cb_focal"},
                                     {"stage2.update_bn_stats": True, "stage2.maxnorm_every": "epoch"}])
def test_variants_train(cifar10_root, options):
    summary = train(small_config(cifar10_root, **{"stage1.epochs": 1, "stage2.epochs": 1, **options}))
    assert summary["stage2"]["final"]["train_loss"] > 0


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
