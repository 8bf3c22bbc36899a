"""Tests of ltsearch.regularizers: tau-normalisation, MaxNorm and weight-decay parameter groups."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ltsearch.regularizers import (
    MaxNorm,
    maxnorm_,
    relative_max_norm,
    row_norms,
    tau_normalize,
    weight_decay_groups,
)


def assert_rows(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected), rtol=0, atol=1e-6)


def rows() -> torch.Tensor:
    return torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2


# ---------------------------------------------------------------- row norms and tau-normalisation

def test_row_norms_hand_example():
    assert row_norms(rows()).tolist() == pytest.approx([5.0, 2.0])


def test_row_norms_flattens_conv_like_weights():
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # norm 2
    w[1, 0, 0, 0] = -3.0  # norm 3
    assert row_norms(w).tolist() == pytest.approx([2.0, 3.0])


def test_tau_one_gives_unit_rows():
    out = tau_normalize(rows(), 1.0)
    assert_rows(out, [[0.6, 0.8], [0.0, 1.0]])


def test_tau_zero_leaves_rows_unchanged():
    assert tau_normalize(rows(), 0.0).tolist() == rows().tolist()


def test_tau_half_divides_by_sqrt_of_the_norm():
    out = tau_normalize(rows(), 0.5)
    s5, s2 = math.sqrt(5.0), math.sqrt(2.0)
    assert_rows(out, [[3.0 / s5, 4.0 / s5], [0.0, 2.0 / s2]])
    assert row_norms(out).tolist() == pytest.approx([s5, s2], abs=1e-6)  # ||w|| / ||w||^0.5


def test_tau_normalize_returns_a_new_tensor():
    w = rows()
    out = tau_normalize(w, 1.0)
    assert out is not w
    assert out.data_ptr() != w.data_ptr()
    assert w.tolist() == [[3.0, 4.0], [0.0, 2.0]]
    out.zero_()
    assert w.tolist() == [[3.0, 4.0], [0.0, 2.0]]


def test_tau_normalize_keeps_a_zero_row_finite():
    out = tau_normalize(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 1.0)
    assert torch.isfinite(out).all()
    assert out.tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_tau_normalize_of_a_parameter_keeps_the_parameter():
    p = nn.Parameter(rows())
    out = tau_normalize(p, 1.0)
    assert p.tolist() == [[3.0, 4.0], [0.0, 2.0]]
    assert_rows(out, [[0.6, 0.8], [0.0, 1.0]])


# ---------------------------------------------------------------- MaxNorm

def test_maxnorm_projects_rows_above_the_cap_in_place():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-6.0, 8.0]])  # norms 5, 2, 10
    ptr = w.data_ptr()
    out = maxnorm_(w, 2.5)
    assert out is w and w.data_ptr() == ptr
    assert row_norms(w).tolist() == pytest.approx([2.5, 2.0, 2.5], abs=1e-6)
    # directions are preserved: rescaled rows stay multiples of the originals
    assert w[0].tolist() == pytest.approx([1.5, 2.0], abs=1e-6)
    assert w[2].tolist() == pytest.approx([-1.5, 2.0], abs=1e-6)
    # the row under the cap is untouched, bit for bit
    assert w[1].tolist() == [0.0, 2.0]


def test_maxnorm_row_exactly_at_the_cap_is_unchanged():
    w = rows()
    maxnorm_(w, 5.0)
    assert w.tolist() == [[3.0, 4.0], [0.0, 2.0]]


def test_maxnorm_on_a_parameter_with_grad_enabled():
    p = nn.Parameter(torch.tensor([[0.0, 10.0], [0.1, 0.0]]))
    maxnorm_(p, 1.0)
    assert p.requires_grad
    assert_rows(p, [[0.0, 1.0], [0.1, 0.0]])
    assert p.grad is None


def test_maxnorm_on_4d_weights_uses_the_flattened_row_norm():
    w = torch.zeros(2, 1, 2, 2)
    w[0].fill_(2.0)  # norm 4
    w[1, 0, 0, 0] = 1.0  # norm 1
    maxnorm_(w, 2.0)
    assert row_norms(w).tolist() == pytest.approx([2.0, 1.0])
    assert w[0].flatten().tolist() == pytest.approx([1.0] * 4)


def test_maxnorm_keeps_zero_rows_finite():
    w = torch.tensor([[0.0, 0.0], [30.0, 40.0]])
    maxnorm_(w, 1.0)
    assert torch.isfinite(w).all()
    assert_rows(w, [[0.0, 0.0], [0.6, 0.8]])


# ---------------------------------------------------------------- relative MaxNorm radius

@pytest.mark.parametrize("thresh, radius", [(0.0, 1.0), (0.1, 1.4), (0.5, 3.0), (1.0, 5.0)])
def test_relative_max_norm_hand_example(thresh, radius):
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])  # norms 5, 2, 1: min 1, max 5
    value = relative_max_norm(w, thresh)
    assert isinstance(value, float)
    assert value == pytest.approx(radius)


def test_relative_max_norm_then_maxnorm_caps_only_the_largest_rows():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    maxnorm_(w, relative_max_norm(w, 0.25))  # 1 + 0.25 * 4 = 2
    assert row_norms(w).tolist() == pytest.approx([2.0, 2.0, 1.0], abs=1e-6)


def test_maxnorm_object_projects_only_after_its_event():
    w = rows()  # norms 5 and 2
    per_epoch = MaxNorm(w, 2.5, every="epoch")
    per_epoch.after("step")
    assert w.tolist() == [[3.0, 4.0], [0.0, 2.0]]
    per_epoch.after("epoch")
    assert_rows(w, [[1.5, 2.0], [0.0, 2.0]])
    w = rows()
    MaxNorm(w, 2.5).after("step")  # every step by default, as the trainer's stage 2
    assert_rows(w, [[1.5, 2.0], [0.0, 2.0]])


# ---------------------------------------------------------------- weight-decay groups

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)  # weight 4-D, bias 1-D
        self.bn = nn.BatchNorm2d(2)  # weight, bias 1-D
        self.fc = nn.Linear(2, 3)  # weight 2-D, bias 1-D
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-D shared scalar (like NBN's)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_all_parameters_are_decayed_by_default():
    net = Net()
    groups = weight_decay_groups(net, 5e-3)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 5e-3
    assert ids(groups[0]["params"]) == ids(net.parameters())
    assert len(groups[0]["params"]) == 7


def test_exempt_norm_bias_moves_low_dim_params_to_a_zero_decay_group():
    net = Net()
    decay, no_decay = weight_decay_groups(net, 0.1, exempt_norm_bias=True)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight])
    assert ids(no_decay["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.scale])


def test_explicit_exempt_moves_only_that_parameter():
    net = Net()
    decay, no_decay = weight_decay_groups(net, 0.1, exempt=[net.scale])
    assert ids(no_decay["params"]) == {id(net.scale)}
    assert no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids(net.parameters()) - {id(net.scale)}


def test_exempt_and_exempt_norm_bias_do_not_duplicate():
    net = Net()
    groups = weight_decay_groups(net, 0.1, exempt_norm_bias=True, exempt=[net.fc.weight, net.fc.bias])
    decay, no_decay = groups
    assert ids(decay["params"]) == {id(net.conv.weight)}
    assert len(no_decay["params"]) == 6
    assert len(decay["params"]) + len(no_decay["params"]) == 7


def test_frozen_parameters_are_left_out():
    net = Net()
    for p in net.conv.parameters():
        p.requires_grad_(False)
    groups = weight_decay_groups(net, 0.1, exempt_norm_bias=True)
    everything = ids(p for g in groups for p in g["params"])
    assert id(net.conv.weight) not in everything and id(net.conv.bias) not in everything
    assert everything == ids([net.bn.weight, net.bn.bias, net.fc.weight, net.fc.bias, net.scale])


def test_shared_parameter_appears_once():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    (group,) = weight_decay_groups(model, 0.1)
    assert len(group["params"]) == 2


def test_groups_drive_an_optimizer():
    net = Net()
    groups = weight_decay_groups(net, 0.5, exempt_norm_bias=True)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before_w, before_b = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    torch.optim.SGD(groups, lr=0.1).step()
    # zero gradient: decayed weights shrink by (1 - lr * wd) = 0.95, exempt biases stay
    assert torch.allclose(net.fc.weight, before_w * 0.95)
    assert torch.equal(net.fc.bias, before_b)


def test_decay_keeps_a_parameter_decayed_when_norms_and_biases_are_exempt():
    """NBN's shared scale follows its own switch: exempting norms and biases must not exempt it."""
    net = Net()
    decay, no_decay = weight_decay_groups(net, 0.1, exempt_norm_bias=True, decay=[net.scale])
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight, net.scale])
    assert ids(no_decay["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias])


def test_a_parameter_cannot_be_both_exempt_and_decayed():
    net = Net()
    with pytest.raises(ValueError, match="both"):
        weight_decay_groups(net, 0.1, exempt=[net.scale], decay=[net.scale])
