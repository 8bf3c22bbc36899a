"""Tests of ltsearch.optim: the shared SGD step, the epoch loop with MaxNorm, and stage 2's classifier setup."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ltsearch.config import Stage2Config
from ltsearch.losses import ClassBalancedFocal, LogitAdjusted
from ltsearch.models import ClassScale, build_model
from ltsearch.optim import StageSetup, classifier_head, classifier_setup, sgd_step, train_epoch
from ltsearch.regularizers import MaxNorm, relative_max_norm, row_norms


def test_sgd_step_sets_the_lr_and_drops_stale_gradients():
    w = nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.SGD([w], lr=123.0)
    w.grad = torch.tensor(100.0)  # left over from elsewhere: must not be added
    sgd_step(optimizer, 2 * w, lr=0.1)  # d(2w)/dw = 2: w = 1 - 0.1 * 2
    assert w.item() == pytest.approx(0.8)
    assert optimizer.param_groups[0]["lr"] == 0.1


def linear_setup(every: str | None, radius: float = 0.5) -> tuple[StageSetup, nn.Linear]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # row norms sqrt(3), above the radius
    return StageSetup(
        module=layer, optimizer=torch.optim.SGD(layer.parameters(), lr=0.0), loss_fn=nn.CrossEntropyLoss(),
        lr=lambda step: 0.01 * (step + 1), logits=layer, set_modes=layer.train,
        max_norm=None if every is None else MaxNorm(layer.weight, radius, every)), layer


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1])) for _ in range(n)]


def test_train_epoch_returns_the_summed_loss_and_the_last_lr():
    setup, layer = linear_setup(None)
    expected = 0.0
    for step, (x, y) in enumerate(batches(), 4):  # the same plain SGD steps by hand
        loss = nn.functional.cross_entropy(layer(x), y)
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        with torch.no_grad():
            for p, g in zip(layer.parameters(), grads):
                p -= 0.01 * (step + 1) * g
        expected += loss.item()
    by_hand = layer.weight.detach().clone()
    setup, layer = linear_setup(None)
    loss_sum, lr = train_epoch(setup, batches(), first_step=4)
    assert loss_sum.dtype == torch.float64 and loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert lr == pytest.approx(0.01 * 7)  # steps 4, 5, 6
    torch.testing.assert_close(layer.weight.detach(), by_hand)


@pytest.mark.parametrize("every", ["step", "epoch"])
def test_train_epoch_projects_after_every_step_or_only_after_the_epoch(every):
    setup, layer = linear_setup(every)
    norms_after_step = []
    step = setup.optimizer.step

    def recording_step(*args, **kwargs):  # row norms right after each update, before any projection
        step(*args, **kwargs)
        norms_after_step.append(row_norms(layer.weight).max().item())

    setup.optimizer.step = recording_step
    train_epoch(setup, batches(), first_step=0)
    assert row_norms(layer.weight).max().item() <= 0.5 + 1e-6  # capped at the end either way
    # per step: from the second step on the update starts inside the ball, so it stays close to it;
    # per epoch: the rows stay near sqrt(3) until the end
    if every == "step":
        assert max(norms_after_step[1:]) < 0.6
    else:
        assert min(norms_after_step) > 1.5


def test_classifier_head_is_named_as_in_the_model():
    model = build_model("resnet8", 5, classifier_bn="affine")
    keys = {k for k in model.state_dict() if k.startswith(("classifier.", "logit_bn."))}
    assert set(classifier_head(model).state_dict()) == keys


def test_classifier_setup_trains_only_the_head_with_its_settings():
    model = build_model("resnet8", 4, classifier_bn="affine")
    stage1 = model.classifier.weight.detach().clone() * 3
    cfg = Stage2Config(epochs=2, lr=0.05, momentum=0.5, weight_decay=0.2, loss="cb_focal", focal_gamma=2.0,
                       maxnorm_thresh=0.25, maxnorm_every="epoch")
    setup = classifier_setup(model, cfg, [40, 20, 10, 5], stage1, steps_per_epoch=3)
    params = [p for group in setup.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in (*model.classifier.parameters(), *model.logit_bn.parameters())}
    assert setup.optimizer.param_groups[0]["weight_decay"] == 0.2
    assert setup.optimizer.defaults["momentum"] == 0.5
    assert isinstance(setup.loss_fn, ClassBalancedFocal) and setup.loss_fn.gamma == 2.0
    assert setup.lr(0) == pytest.approx(0.05) and setup.lr(3) == pytest.approx(0.025)  # cosine over 6 steps
    assert setup.max_norm.weight is model.classifier.weight and setup.max_norm.every == "epoch"
    assert setup.max_norm.radius == pytest.approx(relative_max_norm(stage1, 0.25))
    feats = torch.randn(2, model.feature_dim)
    model.eval()
    torch.testing.assert_close(setup.logits(feats), model.logits_from_features(feats))
    cfg = cfg.model_copy(update={"maxnorm_thresh": None})
    assert classifier_setup(model, cfg, [40, 20, 10, 5], stage1, steps_per_epoch=3).max_norm is None


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_lws_learns_only_per_class_scales_of_the_frozen_classifier(classifier):
    torch.manual_seed(0)
    model = build_model("resnet8", 4, classifier=classifier, cosine_scale=10.0)
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    cfg = Stage2Config(mode="lws", lr=0.5, weight_decay=1e-3, loss="ce", maxnorm_thresh=0.1)
    setup = classifier_setup(model, cfg, [40, 20, 10, 5], model.classifier.weight.detach(), steps_per_epoch=3)
    assert isinstance(model.logit_bn, ClassScale) and setup.max_norm is None  # nothing for MaxNorm to cap
    params = [p for group in setup.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in params] == [id(model.logit_bn.scale)]
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, model.feature_dim, generator=g), torch.tensor([0, 1, 2, 3] * 2)) for _ in range(3)]
    train_epoch(setup, batches, first_step=0)
    for key, value in model.classifier.state_dict().items():
        assert torch.equal(value, before[key]), key  # classifier weights (and bias) unchanged
    scale = model.logit_bn.scale.detach()
    assert not torch.equal(scale, torch.ones(4))
    feats = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model.logits_from_features(feats), model.classifier(feats) * scale)


def test_classifier_setup_builds_the_configured_loss_with_its_parameters():
    model = build_model("resnet8", 2)
    cfg = Stage2Config(loss="logit_adjusted", logit_adjust_tau=2.0)
    setup = classifier_setup(model, cfg, [3, 1], model.classifier.weight.detach(), steps_per_epoch=1)
    assert isinstance(setup.loss_fn, LogitAdjusted)
    # counts [3, 1], tau 2: logits [0, 0] become [2 log(3/4), 2 log(1/4)]: class 0 has probability 9/10
    loss = setup.loss_fn(torch.zeros(1, 2), torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(0.9), rel=1e-6)
