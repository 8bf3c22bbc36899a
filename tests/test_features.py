"""Stage 2 on cached features (the staged search's second phase), on a tiny synthetic CIFAR-10."""
from __future__ import annotations

import shutil

import pytest
import torch

from ltsearch.config import with_overrides
from ltsearch.features import cache_features, fit_classifier
from ltsearch.train import train

from .test_train import small_config


@pytest.fixture(scope="module")
def stage1(cifar10_root, tmp_path_factory):
    """A 2-epoch stage-1 run and a copy of its last checkpoint."""
    config = small_config(cifar10_root, **{"stage2.enabled": False})
    out = tmp_path_factory.mktemp("stage1")
    saved = []
    train(config, report=lambda m, ckpt: saved.append(shutil.copytree(ckpt, out / f"e{m['epoch']}")))
    return config, saved[-1]


def test_cache_holds_views_val_test_and_the_best_classifier(stage1):
    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=3)
    n_train = sum(cache["class_counts"])
    assert len(cache["train_views"]) == 3
    feats0, labels0 = cache["train_views"][0]
    assert feats0.shape == (n_train, cache["feature_dim"]) and labels0.shape == (n_train,)
    assert not torch.equal(feats0, cache["train_views"][1][0])  # different augmentations
    assert cache["val"][0].shape[0] == 10 * 5 and cache["test"][0].shape[0] == 10 * 20
    best = torch.load(ckpt / "state.pt", weights_only=False)["best"][1]["model"]
    assert torch.equal(cache["head"]["classifier.weight"], best["classifier.weight"])


def test_fit_classifier_reports_every_epoch_and_caps_norms(stage1):
    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=2)
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 3, "stage2.maxnorm_thresh": 0.0,
                                     "stage2.weight_decay": 0.0})
    reports = []
    last = fit_classifier(cache, config, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3] and last is reports[-1]
    cap = cache["head"]["classifier.weight"].norm(dim=1).min().item()
    assert max(last["classifier_norms"]) <= cap + 1e-5
    assert 0 <= last["val_acc"] <= 100 and "tau_val_acc" in last and "test_acc_tail" in last


def test_tau_only_evaluates_the_stage1_classifier(stage1):
    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=1)
    plain = fit_classifier(cache, with_overrides(config, {"posthoc.tau": 0.0}))
    normed = fit_classifier(cache, with_overrides(config, {"posthoc.tau": 1.0}))
    assert plain["epoch"] == 1 and "train_loss" not in plain
    assert plain["tau_val_acc"] == plain["val_acc"]  # tau 0 leaves the classifier unchanged
    assert normed["val_acc"] == plain["val_acc"]  # the un-normalised metrics do not depend on tau
    assert plain["classifier_norms"] == pytest.approx(cache["head"]["classifier.weight"].norm(dim=1).tolist())


def test_fit_classifier_refuses_a_head_that_does_not_fit(stage1):
    """Bug 9: the stage-1 head used to be loaded with strict=False, so a missing classifier silently became a
    random one. Every key of the classifier (and of the logit BN when configured) must be in the cache."""
    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=1)
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 1})
    headless = {**cache, "head": {k: v for k, v in cache["head"].items() if k != "classifier.weight"}}
    with pytest.raises(ValueError, match=r"missing \['classifier.weight'\]"):
        fit_classifier(headless, config)
    with pytest.raises(ValueError, match=r"classifier_bn='affine': missing \['logit_bn.bias'"):
        fit_classifier(cache, with_overrides(config, {"model.classifier_bn": "affine"}))
