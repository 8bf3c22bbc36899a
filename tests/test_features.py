"""Stage 2 on cached features (the staged search's second phase), on a tiny synthetic CIFAR-10."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from ltsearch import features
from ltsearch.config import ExperimentConfig, with_overrides
from ltsearch.features import FEATURE_DTYPE, cache_features, fit_classifier
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
    assert feats0.dtype == cache["val"][0].dtype == cache["test"][0].dtype == FEATURE_DTYPE == torch.float16
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


def test_fit_classifier_keeps_the_per_image_validation_correctness_in_the_trainers_order(stage1):
    """`val_correct` of a stage-2 epoch counts its val accuracies, and the stage-1 head evaluated on cached
    features gets right the images the trainer's best epoch got right (same images, same order: the paired
    tie test compares a stage-2 trial with another image by image)."""
    import numpy as np

    from ltsearch.files import PREDICTIONS_FILE
    from ltsearch.selection import unpack_correct

    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=1)
    tau = fit_classifier(cache, config)  # stage 2 off: the stage-1 head, with the trainer's posthoc.tau
    correct = tau["val_correct"]
    assert correct.dtype == torch.bool and correct.shape == (2, 50)
    assert 100 * correct[0].double().mean().item() == pytest.approx(tau["val_acc"])
    assert 100 * correct[1].double().mean().item() == pytest.approx(tau["tau_val_acc"])
    trainer_best = unpack_correct(np.load(ckpt / PREDICTIONS_FILE), 50)[1]  # the best epoch's, stage 2's parent
    assert (correct.numpy() == trainer_best).mean() >= 0.96  # float16 features may flip a near-tie or two
    fitted = fit_classifier(cache, with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 2}))
    assert 100 * fitted["val_correct"][0].double().mean().item() == pytest.approx(fitted["val_acc"])


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


# ---------------------------------------------------------------- stage-2 variants on cached features

@pytest.mark.parametrize("mode, sampler, loss", [
    ("retrain", "class_balanced", "ce"),  # cRT
    ("retrain", "sqrt", "balanced_softmax"),
    ("retrain", "instance", "logit_adjusted"),
    ("retrain", "class_balanced", "ldam"),
    ("lws", "class_balanced", "ce"),
    ("lws", "instance", "cb_softmax_bce"),
])
def test_fit_classifier_runs_every_stage2_variant(stage1, mode, sampler, loss, monkeypatch):
    from ltsearch import data

    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=2)
    drawn = []
    original = data.SAMPLERS[sampler]
    monkeypatch.setitem(data.SAMPLERS, sampler, lambda labels, g: drawn.append(len(labels)) or original(labels, g))
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 2, "stage2.mode": mode,
                                     "stage2.sampler": sampler, "stage2.loss": loss, "stage2.lr": 0.05})
    reports = []
    last = fit_classifier(cache, config, report=reports.append)
    n_train = sum(cache["class_counts"])
    assert drawn == [n_train, n_train]  # one draw per epoch, over the cached training features
    assert [r["epoch"] for r in reports] == [1, 2] and last["train_loss"] > 0
    assert 0 <= last["val_acc"] <= 100 and "tau_val_acc" in last
    stage1_norms = cache["head"]["classifier.weight"].norm(dim=1).tolist()
    # retrain changes the rows; lws freezes them, but the rows that classify are the frozen ones times the scales
    assert last["classifier_norms"] != pytest.approx(stage1_norms)


def test_lws_on_features_matches_the_scaled_stage1_logits(stage1, monkeypatch):
    """An LWS fit changes predictions only through per-class scales: the cached stage-1 logits times the fitted
    scales give exactly the reported validation accuracy."""
    config, ckpt = stage1
    cache = cache_features(config, str(ckpt), views=1)
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 2, "stage2.mode": "lws",
                                     "stage2.sampler": "class_balanced", "stage2.loss": "ce", "stage2.lr": 0.5})
    captured, metrics = {}, features.classifier_metrics

    def spy(model, *args, **kw):  # the model fit_classifier evaluates
        captured["scale"] = model.logit_bn.scale.detach().clone()
        return metrics(model, *args, **kw)

    monkeypatch.setattr(features, "classifier_metrics", spy)
    last = fit_classifier(cache, config)
    feats, labels = cache["val"][0].float(), cache["val"][1]
    w, b = cache["head"]["classifier.weight"], cache["head"]["classifier.bias"]
    predicted = ((feats @ w.T + b) * captured["scale"]).argmax(1)
    assert last["val_acc"] == pytest.approx(100.0 * (predicted == labels).double().mean().item())
    assert not torch.equal(captured["scale"], torch.ones(10))
    # the norms reported are those of the rows that classify, s_c * w_c, not the frozen stage-1 rows
    assert last["classifier_norms"] == pytest.approx((w.norm(dim=1) * captured["scale"].abs()).tolist())


@pytest.fixture(scope="module")
def cosine_stage1(cifar10_root, tmp_path_factory):
    """A 1-epoch stage-1 run with a cosine classifier (scale 16) and its checkpoint."""
    config = small_config(cifar10_root, **{"stage2.enabled": False, "stage1.epochs": 1,
                                           "model.classifier": "cosine", "model.cosine_scale": 16.0})
    out = tmp_path_factory.mktemp("cosine")
    saved = []
    train(config, report=lambda m, ckpt: saved.append(shutil.copytree(ckpt, out / f"e{m['epoch']}")))
    return config, saved[-1]


@pytest.mark.parametrize("mode", ["retrain", "lws"])
def test_fit_classifier_on_a_cosine_head(cosine_stage1, mode):
    config, ckpt = cosine_stage1
    cache = cache_features(config, str(ckpt), views=1)
    assert set(cache["head"]) == {"classifier.weight"}  # no bias
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 1, "stage2.mode": mode,
                                     "stage2.loss": "ce", "stage2.sampler": "class_balanced"})
    last = fit_classifier(cache, config)
    assert last["train_loss"] > 0 and 0 <= last["val_acc"] <= 100
    with pytest.raises(ValueError, match=r"model.classifier='linear'.*missing \['classifier.bias'\]"):
        fit_classifier(cache, with_overrides(config, {"model.classifier": "linear"}))


# ---------------------------------------------------------------- compact (float16) features

def _as_dtype(cache: dict, dtype: torch.dtype) -> dict:
    def cast(split):
        return split[0].to(dtype), split[1]

    return {**cache, "train_views": [cast(v) for v in cache["train_views"]], "val": cast(cache["val"]),
            "test": cast(cache["test"])}


def test_compact_cache_is_the_float32_cache_rounded_and_fits_alike(stage1, monkeypatch):
    """Features are rounded to float16 after the backbone, nothing else changes: stage 2 on them reports what it
    reports on float32 features, to within one of the 200 test images (0.5 points; see the synthetic test for
    why that is generous)."""
    config, ckpt = stage1
    compact = cache_features(config, str(ckpt), views=2)
    monkeypatch.setattr(features, "FEATURE_DTYPE", torch.float32)
    full = cache_features(config, str(ckpt), views=2)
    assert full["test"][0].dtype == torch.float32
    assert all(torch.equal(c[0], f[0].half()) and torch.equal(c[1], f[1])
               for c, f in zip([*compact["train_views"], compact["val"], compact["test"]],
                               [*full["train_views"], full["val"], full["test"]]))
    config = with_overrides(config, {"stage2.enabled": True, "stage2.epochs": 3, "posthoc.tau": 1.0})
    on_compact, on_full = fit_classifier(compact, config), fit_classifier(full, config)
    for key in ("val_acc", "test_acc", "tau_test_acc"):
        assert on_compact[key] == pytest.approx(on_full[key], abs=0.5), key
    assert on_compact["classifier_norms"] == pytest.approx(on_full["classifier_norms"], rel=1e-3)


def _synthetic_cache(seed: int) -> dict:
    """Long-tailed (IF 20, 400 -> 20 images) post-ReLU features of 10 overlapping Gaussian classes, 64-d (the
    width of `resnet8`, whose head stage 2 retrains), 2 views; 2,000 balanced test images."""
    g = torch.Generator().manual_seed(seed)
    counts = [round(400 * 20 ** (-c / 9)) for c in range(10)]
    centres = 0.5 * torch.randn(10, 64, generator=g)

    def split(per_class):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        return torch.relu(centres[y] + torch.randn(len(y), 64, generator=g)), y

    head = {"classifier.weight": 0.01 * torch.randn(10, 64, generator=g), "classifier.bias": torch.zeros(10)}
    return {"train_views": [split(counts), split(counts)], "val": split([20] * 10), "test": split([200] * 10),
            "head": head, "class_counts": counts, "num_classes": 10, "feature_dim": 64}


@pytest.mark.parametrize("seed", [0, 1])
def test_float16_features_fit_as_float32_ones(seed):
    """Tolerance: float16 rounds each feature by at most 2^-11 of itself, so a logit moves by about 5e-4 of its
    scale and only a test image whose two top logits are that close can change its prediction; the fitted
    weights move by the same order. Measured on these caches (seeds 0-4): at most 1 of 2,000 test predictions
    changed (plain or tau), row norms within 3e-5; bfloat16 (rounding 8x coarser): 1 image in 3 seeds, norms
    within 2e-4; features rounded to steps of 1/4: up to 10 images, norms off by 2e-3 to 5e-3. The test allows
    5 images (0.25 points) and 1e-3 on the norms: float16 passes with room, the 1/4-step rounding fails, and
    0.25 points is half of what one image is worth on the 200-image validation sets selection uses here."""
    cache = _synthetic_cache(seed)
    config = ExperimentConfig.model_validate({
        "model": {"name": "resnet8"}, "posthoc": {"tau": 1.0},
        "stage2": {"epochs": 10, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "sampler": "class_balanced",
                   "maxnorm_thresh": None}})
    full, compact = fit_classifier(cache, config), fit_classifier(_as_dtype(cache, torch.float16), config)
    assert 30 < full["test_acc"] < 80  # the classes overlap: predictions near a boundary exist
    for key in ("test_acc", "tau_test_acc", "test_acc_tail"):
        assert compact[key] == pytest.approx(full[key], abs=0.25), key
    assert compact["classifier_norms"] == pytest.approx(full["classifier_norms"], rel=1e-3)


def test_features_that_overflow_float16_are_refused():
    model = SimpleNamespace(features=lambda x: x)
    batches = [(torch.tensor([[1.0, 7e4]]), torch.tensor([0]))]
    with pytest.raises(ValueError, match=r"features of runs/x/checkpoint do not fit torch.float16 .*7e\+04"):
        features._features(model, batches, "runs/x/checkpoint")
