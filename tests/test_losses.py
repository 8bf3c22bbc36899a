"""Tests of ltsearch.losses against hand-computed values on tiny synthetic batches."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ltsearch.build import loss_from_config
from ltsearch.config import Stage1Config, Stage2Config
from ltsearch.losses import (
    LOSSES,
    DeferredReweighting,
    build_loss,
    class_balanced_weights,
    ldam_margins,
)

# ---------------------------------------------------------------- class-balanced weights

def test_class_balanced_weights_hand_computed():
    # effective number E_n = (1 - beta^n) / (1 - beta); weight = 1 / E_n, then scaled to sum to C = 3
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** 100), (1 - beta) / (1 - 0.3486784401), (1 - beta) / (1 - beta)]
    # 0.9^10 = 0.3486784401 exactly; 1 / E_1 = 1
    assert raw[2] == pytest.approx(1.0)
    expected = [3 * r / sum(raw) for r in raw]
    w = class_balanced_weights([100, 10, 1], beta)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    # the same numbers written out (rounded): rarest class weighted ten times the most frequent one
    assert w.tolist() == pytest.approx([0.239329, 0.367442, 2.393229], abs=1e-5)
    assert w.sum().item() == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("counts, beta", [([100, 10, 1], 0.9), ([500, 5], 0.9999), ([7] * 10, 0.99),
                                          ([3, 1, 4, 1, 5], 0.5)])
def test_class_balanced_weights_sum_to_num_classes_and_decrease_with_count(counts, beta):
    w = class_balanced_weights(counts, beta)
    assert w.shape == (len(counts),)
    assert w.sum().item() == pytest.approx(len(counts), rel=1e-6)
    order = sorted(range(len(counts)), key=lambda c: counts[c])
    ws = [w[c].item() for c in order]
    assert all(a >= b - 1e-7 for a, b in itertools.pairwise(ws))  # smaller class -> larger (or equal) weight


def test_class_balanced_weights_beta_zero_is_all_ones():
    w = class_balanced_weights([100, 10, 1, 0], 0.0)
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_class_balanced_weights_equal_counts_are_all_ones():
    assert class_balanced_weights([20, 20, 20], 0.9999).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_balanced_weights_accepts_a_tensor():
    assert class_balanced_weights(torch.tensor([100, 10, 1]), 0.9).tolist() == pytest.approx(
        class_balanced_weights([100, 10, 1], 0.9).tolist())


# ---------------------------------------------------------------- every registered loss

COUNTS = [50, 10, 2]


def _confident(target: torch.Tensor, num_classes: int, correct: bool) -> torch.Tensor:
    cls = target if correct else (target + 1) % num_classes
    return F.one_hot(cls, num_classes).float() * 16.0 - 8.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_loss_is_a_finite_scalar_with_gradient(name):
    torch.manual_seed(0)
    loss_fn = build_loss(name, COUNTS, beta=0.99, gamma=1.0)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = loss_fn(logits, target)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert loss.item() > 0
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_loss_prefers_correct_confident_logits(name):
    loss_fn = build_loss(name, COUNTS, beta=0.99, gamma=2.0)
    target = torch.tensor([0, 1, 2, 2])
    right = loss_fn(_confident(target, 3, True), target).item()
    wrong = loss_fn(_confident(target, 3, False), target).item()
    uniform = loss_fn(torch.zeros(4, 3), target).item()
    assert right < uniform < wrong
    assert right < 0.01


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_loss_accepts_half_precision_logits(name):
    loss_fn = build_loss(name, COUNTS, beta=0.99)
    target = torch.tensor([0, 2])
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    full = loss_fn(logits, target)
    half = loss_fn(logits.bfloat16(), target)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=1e-2)


def test_registry_names():
    assert set(LOSSES) == {"ce", "balanced_softmax", "logit_adjusted", "ldam", "cb_ce", "cb_softmax_bce", "cb_focal"}


# ---------------------------------------------------------------- individual losses

def test_ce_equals_cross_entropy_and_ignores_counts():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    target = torch.tensor([0, 2, 0])
    loss = build_loss("ce", [1000, 10, 1], beta=0.9)(logits, target)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    # hand value for the first sample: -log softmax = log(e^2 + 1 + e^-1) - 2
    first = build_loss("ce", [1, 1, 1])(logits[:1], target[:1]).item()
    assert first == pytest.approx(math.log(math.exp(2) + 1 + math.exp(-1)) - 2, rel=1e-6)


def test_cb_ce_with_equal_counts_is_plain_ce():
    torch.manual_seed(1)
    logits = torch.randn(8, 4)
    target = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    loss = build_loss("cb_ce", [30, 30, 30, 30], beta=0.9999)(logits, target)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


def test_cb_ce_is_the_weighted_mean_of_per_sample_ce():
    # two samples, class weights w0, w1; weighted mean = (w0 * l0 + w1 * l1) / (w0 + w1)
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([0, 1])
    w = class_balanced_weights([100, 10], 0.9).tolist()
    l0 = math.log(1 + math.exp(-1.0))  # -log sigmoid(1)
    l1 = math.log(1 + math.exp(1.0))   # -log sigmoid(-1)
    expected = (w[0] * l0 + w[1] * l1) / (w[0] + w[1])
    loss = build_loss("cb_ce", [100, 10], beta=0.9)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() > F.cross_entropy(logits, target).item()  # the rare class's mistake weighs more


def test_cb_softmax_bce_hand_example():
    # 2 samples, 3 classes, beta 0: weights all 1, so the loss is the mean BCE over the 6 entries
    # sample 0: logits [0, 0, 0] -> p = [1/3, 1/3, 1/3], target 0
    # sample 1: logits [ln 2, 0, 0] -> p = [1/2, 1/4, 1/4], target 2
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    target = torch.tensor([0, 2])
    s0 = -math.log(1 / 3) - math.log(2 / 3) - math.log(2 / 3)
    s1 = -math.log(1 - 1 / 2) - math.log(1 - 1 / 4) - math.log(1 / 4)
    loss = build_loss("cb_softmax_bce", [5, 5, 5], beta=0.0)(logits, target)
    assert loss.item() == pytest.approx((s0 + s1) / 6, rel=1e-6)
    assert loss.item() == pytest.approx(0.712778, abs=1e-5)  # (1.909543 + 2.367124) / 6


def test_cb_softmax_bce_weights_each_sample_by_its_class():
    # same logits with class weights w = class_balanced_weights([100, 10, 1], 0.9):
    # every entry of sample i is weighted by w[target_i]; the mean is still over the 6 entries
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    target = torch.tensor([0, 2])
    w = [0.23932923600883355, 0.3674419730958617, 2.3932287908953045]
    s0 = -math.log(1 / 3) - 2 * math.log(2 / 3)
    s1 = -math.log(1 / 2) - math.log(3 / 4) - math.log(1 / 4)
    loss = build_loss("cb_softmax_bce", [100, 10, 1], beta=0.9)(logits, target)
    assert loss.item() == pytest.approx((w[0] * s0 + w[2] * s1) / 6, rel=1e-5)


def test_cb_focal_gamma_zero_is_weighted_sigmoid_bce_over_batch_size():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    target = torch.tensor([1, 0])
    counts, beta = [100, 10, 1], 0.9
    w = class_balanced_weights(counts, beta).tolist()

    def bce(x, y):  # -[y log s(x) + (1 - y) log(1 - s(x))]
        s = 1 / (1 + math.exp(-x))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    total = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        total += w[t] * sum(bce(x, 1.0 if c == t else 0.0) for c, x in enumerate(row))
    loss = build_loss("cb_focal", counts, beta=beta, gamma=0.0)(logits, target)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)


def test_cb_focal_gamma_two_down_weights_easy_entries():
    # focal term (1 - p_t)^gamma with p_t = sigmoid(x) for the target entry, 1 - sigmoid(x) otherwise
    logits = torch.tensor([[3.0, -2.0]])
    target = torch.tensor([0])
    s0, s1 = 1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(2.0))
    expected = (1 - s0) ** 2 * -math.log(s0) + s1 ** 2 * -math.log(1 - s1)
    loss = build_loss("cb_focal", [4, 4], beta=0.9, gamma=2.0)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() < build_loss("cb_focal", [4, 4], beta=0.9, gamma=0.0)(logits, target).item()


def test_class_weights_are_a_buffer_that_follows_the_module():
    loss_fn = build_loss("cb_ce", [100, 10, 1], beta=0.9)
    assert "class_weights" in dict(loss_fn.named_buffers())
    assert loss_fn.class_weights.tolist() == pytest.approx([0.239329, 0.367442, 2.393229], abs=1e-5)
    assert loss_fn.double().class_weights.dtype == torch.float64


def test_build_loss_unknown_name():
    with pytest.raises(ValueError, match="'hinge'") as info:
        build_loss("hinge", [1, 2, 3])
    for name in LOSSES:
        assert name in str(info.value)


# ---------------------------------------------------------------- logit-adjusting losses, by hand

def test_balanced_softmax_hand_example():
    # 2 classes, logits [0, 0], counts [3, 1]: the loss is CE on [0 + log 3, 0 + log 1]
    # class 0: -log(e^{log 3} / (e^{log 3} + e^{log 1})) = -log(3 / 4); class 1: -log(1 / 4)
    loss_fn = build_loss("balanced_softmax", [3, 1])
    zeros = torch.zeros(1, 2)
    assert loss_fn(zeros, torch.tensor([0])).item() == pytest.approx(-math.log(3 / 4), rel=1e-6)
    assert loss_fn(zeros, torch.tensor([1])).item() == pytest.approx(-math.log(1 / 4), rel=1e-6)
    both = loss_fn(torch.zeros(2, 2), torch.tensor([0, 1])).item()
    assert both == pytest.approx((-math.log(3 / 4) - math.log(1 / 4)) / 2, rel=1e-6)
    # logits [ln 2, 0], counts [1, 2]: adjusted [ln 2 + ln 1, 0 + ln 2] = [ln 2, ln 2], so -log(1/2) either way
    half = build_loss("balanced_softmax", [1, 2])(torch.tensor([[math.log(2.0), 0.0]]), torch.tensor([1]))
    assert half.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_logit_adjusted_hand_example():
    # counts [3, 1], pi = [3/4, 1/4], tau 2: adjusted logits [2 log(3/4), 2 log(1/4)], i.e. e^z = [9/16, 1/16]
    # class 0: -log((9/16) / (10/16)) = -log(9/10); class 1: -log(1/10)
    loss_fn = build_loss("logit_adjusted", [3, 1], logit_adjust_tau=2.0)
    zeros = torch.zeros(1, 2)
    assert loss_fn(zeros, torch.tensor([0])).item() == pytest.approx(-math.log(0.9), rel=1e-6)
    assert loss_fn(zeros, torch.tensor([1])).item() == pytest.approx(-math.log(0.1), rel=1e-6)
    # tau 0 is plain CE: logits [0, 0] give log 2 whatever the counts
    plain = build_loss("logit_adjusted", [3, 1], logit_adjust_tau=0.0)(zeros, torch.tensor([1]))
    assert plain.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_logit_adjusted_with_tau_one_is_balanced_softmax():
    # log pi_c = log n_c - log N: the constant -log N shifts every logit alike and cancels in the softmax
    torch.manual_seed(0)
    logits, target, counts = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0]), [50, 10, 2]
    adjusted = build_loss("logit_adjusted", counts, logit_adjust_tau=1.0)(logits, target)
    balanced = build_loss("balanced_softmax", counts)(logits, target)
    assert adjusted.item() == pytest.approx(balanced.item(), rel=1e-6)


def test_logit_adjusting_losses_survive_a_class_without_images():
    # counts [3, 0, 1]: the empty class gets offset -inf, probability 0; tau 0 must not make 0 * -inf = nan
    logits, target = torch.zeros(1, 3), torch.tensor([0])
    balanced = build_loss("balanced_softmax", [3, 0, 1])(logits, target)
    assert balanced.item() == pytest.approx(-math.log(3 / 4), rel=1e-6)
    plain = build_loss("logit_adjusted", [3, 0, 1], logit_adjust_tau=0.0)(logits, target)
    assert plain.item() == pytest.approx(math.log(3.0), rel=1e-6)


def test_ldam_margins_hand_example():
    # m_c ~ n_c^(-1/4): 16 -> 1/2, 1 -> 1; scaled so the largest is 0.5: [0.25, 0.5]
    assert ldam_margins([16, 1], 0.5).tolist() == pytest.approx([0.25, 0.5])
    # 81 -> 1/3, 16 -> 1/2, 1 -> 1, largest 0.5: [1/6, 1/4, 1/2]; a class without images gets 0
    assert ldam_margins([81, 16, 1, 0], 0.5).tolist() == pytest.approx([1 / 6, 1 / 4, 1 / 2, 0.0])


def test_ldam_hand_example():
    # counts [16, 1], max margin 0.5 -> margins [0.25, 0.5]; scale 2; logits [0, 0]
    # target 0: CE on 2 * [0 - 0.25, 0] = [-0.5, 0] -> -log(e^-0.5 / (e^-0.5 + 1)) = log(1 + e^0.5)
    # target 1: CE on 2 * [0, 0 - 0.5] = [0, -1]    -> log(1 + e^1)
    loss_fn = build_loss("ldam", [16, 1], ldam_max_margin=0.5, ldam_scale=2.0)
    zeros = torch.zeros(1, 2)
    assert loss_fn(zeros, torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-6)
    assert loss_fn(zeros, torch.tensor([1])).item() == pytest.approx(math.log(1 + math.exp(1.0)), rel=1e-6)
    # only the true class's logit moves: cosines [0.5, 0.2], target 1, defaults (max margin 0.5, scale 30)
    # -> 30 * [0.5, 0.2 - 0.5] = [15, -9] -> log(1 + e^24)
    default = build_loss("ldam", [16, 1])(torch.tensor([[0.5, 0.2]]), torch.tensor([1]))
    assert default.item() == pytest.approx(math.log(1 + math.exp(24.0)), rel=1e-6)


def test_ldam_class_weight_is_a_weighted_mean():
    # per-sample losses from the hand example, weights [1, 3]: (1 * l0 + 3 * l1) / (1 + 3)
    loss_fn = build_loss("ldam", [16, 1], ldam_max_margin=0.5, ldam_scale=2.0)
    l0, l1 = math.log(1 + math.exp(0.5)), math.log(1 + math.exp(1.0))
    loss = loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), weight=torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx((l0 + 3 * l1) / 4, rel=1e-6)


def test_ce_label_smoothing_hand_example():
    # 2 classes, eps 0.2: target 0 becomes q = [1 - 0.2 + 0.1, 0.1] = [0.9, 0.1]
    # logits [0, ln 3] -> p = [1/4, 3/4]; loss = -(0.9 log(1/4) + 0.1 log(3/4))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss = build_loss("ce", [5, 5], label_smoothing=0.2)(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(-(0.9 * math.log(1 / 4) + 0.1 * math.log(3 / 4)), rel=1e-6)
    assert build_loss("ce", [5, 5])(logits, torch.tensor([0])).item() == pytest.approx(math.log(4.0), rel=1e-6)


# ---------------------------------------------------------------- deferred re-weighting and config

def _cb_weights_by_hand(counts, beta):
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [len(counts) * r / sum(raw) for r in raw]


def test_drw_is_unweighted_before_its_epoch_and_class_balanced_from_it_on():
    counts, beta = [100, 10], 0.9
    loss_fn = loss_from_config(Stage1Config(loss="ce", drw_epoch=2, drw_beta=beta), counts)
    assert isinstance(loss_fn, DeferredReweighting)
    logits, target = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    l0, l1 = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))  # -log sigmoid(1), -log sigmoid(-1)
    w = _cb_weights_by_hand(counts, beta)
    weighted = (w[0] * l0 + w[1] * l1) / (w[0] + w[1])
    seen = {}
    for epoch in (0, 1, 2, 5, 1):  # the last: a run resumed at an earlier epoch switches back
        loss_fn.set_epoch(epoch)
        seen[epoch] = loss_fn(logits, target).item()
    assert seen[0] == seen[1] == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert seen[2] == seen[5] == pytest.approx(weighted, rel=1e-6)
    assert loss_fn.weights.tolist() == pytest.approx(w, rel=1e-6)


def test_drw_wraps_ldam_with_its_parameters():
    cfg = Stage1Config(loss="ldam", ldam_max_margin=0.5, ldam_scale=2.0, drw_epoch=0, drw_beta=0.9)
    loss_fn = loss_from_config(cfg, [16, 1])
    loss_fn.set_epoch(0)
    w = _cb_weights_by_hand([16, 1], 0.9)
    l0, l1 = math.log(1 + math.exp(0.5)), math.log(1 + math.exp(1.0))  # test_ldam_hand_example
    loss = loss_fn(torch.zeros(2, 2), torch.tensor([0, 1])).item()
    assert loss == pytest.approx((w[0] * l0 + w[1] * l1) / (w[0] + w[1]), rel=1e-6)


def test_loss_from_config_passes_each_stage_its_parameters():
    stage1 = loss_from_config(Stage1Config(loss="logit_adjusted", logit_adjust_tau=2.0), [3, 1])
    assert not isinstance(stage1, DeferredReweighting)
    assert stage1(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(-math.log(0.9), rel=1e-6)
    stage2 = loss_from_config(Stage2Config(loss="ce", label_smoothing=0.2), [5, 5])
    logits = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(0.9 * math.log(1 / 4) + 0.1 * math.log(3 / 4))
    assert stage2(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)
    ldam = loss_from_config(Stage2Config(loss="ldam", ldam_max_margin=0.5, ldam_scale=2.0), [16, 1])
    assert ldam(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(math.log(1 + math.exp(1.0)), rel=1e-6)
    focal = loss_from_config(Stage2Config(loss="cb_focal", beta=0.9, focal_gamma=2.0), [4, 4])
    assert focal.gamma == 2.0 and focal.class_weights.tolist() == pytest.approx([1.0, 1.0])
