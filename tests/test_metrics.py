"""Tests of ltsearch.metrics on hand-made predictions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ltsearch.metrics import accuracy_metrics, class_groups, classifier_metrics, per_class_counts
from ltsearch.models import ClassScale


def test_per_class_counts_hand_example():
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    target = torch.tensor([0, 1, 2, 2, 2, 0])
    correct, total = per_class_counts(pred, target, num_classes=4)
    assert correct.dtype == torch.float64 and total.dtype == torch.float64
    assert correct.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert total.tolist() == [2.0, 1.0, 3.0, 0.0]


def test_per_class_counts_sum_across_ranks():
    # two "ranks" see half of the batch each; summing their counts equals counting the whole batch
    pred = torch.tensor([2, 2, 0, 1, 1, 0, 2])
    target = torch.tensor([2, 1, 0, 1, 0, 0, 2])
    c_all, t_all = per_class_counts(pred, target, 3)
    c_a, t_a = per_class_counts(pred[:3], target[:3], 3)
    c_b, t_b = per_class_counts(pred[3:], target[3:], 3)
    assert (c_a + c_b).tolist() == c_all.tolist() == [2.0, 1.0, 2.0]
    assert (t_a + t_b).tolist() == t_all.tolist() == [3.0, 2.0, 2.0]


def test_per_class_counts_empty_batch():
    correct, total = per_class_counts(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    assert correct.tolist() == [0.0, 0.0, 0.0] and total.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- class groups

def test_class_groups_has_shot_and_tercile_groups():
    groups = class_groups([500, 150, 101, 100, 50, 20, 19, 5, 1])
    assert set(groups) == {"many", "medium", "few", "head", "middle", "tail"}
    # shot groups: many > 100, medium 20..100, few < 20
    assert groups["many"] == [0, 1, 2]
    assert groups["medium"] == [3, 4, 5]
    assert groups["few"] == [6, 7, 8]
    # terciles of 9 classes by count, descending
    assert groups["head"] == [0, 1, 2] and groups["middle"] == [3, 4, 5] and groups["tail"] == [6, 7, 8]


def test_class_groups_terciles_sort_by_count_and_split_unevenly():
    groups = class_groups([5, 300, 40, 10])  # descending order: 1, 2, 3, 0
    assert groups["head"] == [1, 2] and groups["middle"] == [3] and groups["tail"] == [0]
    assert groups["many"] == [1] and groups["medium"] == [2] and groups["few"] == [0, 3]


def test_class_groups_cifar10_like_counts_have_no_few_shot_class():
    groups = class_groups([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    assert groups["few"] == []
    assert groups["medium"] == [8, 9]
    assert len(groups["head"]) + len(groups["middle"]) + len(groups["tail"]) == 10


# ---------------------------------------------------------------- accuracy metrics

def test_accuracy_metrics_are_percentages_over_images_of_each_group():
    # class counts (train): 200 many, 50 medium, 30 medium, 5 few
    groups = class_groups([200, 50, 30, 5])
    correct = torch.tensor([9.0, 1.0, 3.0, 0.0])
    total = torch.tensor([10.0, 4.0, 4.0, 2.0])
    out = accuracy_metrics(correct, total, groups, "val")
    assert out["val_acc"] == pytest.approx(100 * 13 / 20)
    assert out["val_acc_many"] == pytest.approx(90.0)
    # medium pools its images: (1 + 3) / (4 + 4), not the mean of 25% and 75% (same here) ...
    assert out["val_acc_medium"] == pytest.approx(50.0)
    assert out["val_acc_few"] == pytest.approx(0.0)
    # head = classes 0, 1 -> (9 + 1) / (10 + 4); middle = class 2; tail = class 3
    assert out["val_acc_head"] == pytest.approx(100 * 10 / 14)
    assert out["val_acc_middle"] == pytest.approx(75.0)
    assert out["val_acc_tail"] == pytest.approx(0.0)
    assert out["val_per_class_acc"] == pytest.approx([90.0, 25.0, 75.0, 0.0])


def test_group_accuracy_weights_by_images_not_by_classes():
    groups = {"g": [0, 1]}
    out = accuracy_metrics(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 9.0]), groups, "test")
    assert out["test_acc_g"] == pytest.approx(10.0)  # 1 / 10, not mean(100, 0) = 50


def test_empty_group_is_none_not_zero():
    groups = class_groups([500, 200, 150, 120])  # no medium, no few class
    assert groups["medium"] == [] and groups["few"] == []
    out = accuracy_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 4.0, 4.0, 4.0]), groups, "val")
    assert out["val_acc_medium"] is None
    assert out["val_acc_few"] is None
    assert out["val_acc_many"] == pytest.approx(100 * 10 / 16)


def test_group_without_images_and_class_without_images_are_none():
    groups = {"a": [0], "b": [1, 2]}
    out = accuracy_metrics(torch.tensor([2.0, 0.0, 0.0]), torch.tensor([4.0, 0.0, 0.0]), groups, "val")
    assert out["val_acc_a"] == pytest.approx(50.0)
    assert out["val_acc_b"] is None
    assert out["val_per_class_acc"][0] == pytest.approx(50.0)
    assert out["val_per_class_acc"][1] is None and out["val_per_class_acc"][2] is None
    assert out["val_acc"] == pytest.approx(50.0)


def test_class_with_images_but_no_correct_prediction_is_zero():
    out = accuracy_metrics(torch.tensor([0.0, 3.0]), torch.tensor([5.0, 3.0]), {}, "x")
    assert out["x_per_class_acc"] == [0.0, 100.0]
    assert out["x_acc"] == pytest.approx(37.5)


def test_accuracy_metrics_keys_and_types():
    groups = class_groups([200, 50, 5])
    correct, total = per_class_counts(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 3)
    out = accuracy_metrics(correct.float(), total.long(), groups, "tau_val")
    assert set(out) == {"tau_val_acc", "tau_val_per_class_acc"} | {f"tau_val_acc_{g}" for g in groups}
    assert isinstance(out["tau_val_acc"], float)
    assert out["tau_val_acc"] == pytest.approx(200 / 3)
    assert out["tau_val_acc_few"] == pytest.approx(0.0)
    assert out["tau_val_per_class_acc"] == [100.0, 100.0, 0.0]


def test_no_images_at_all_gives_zero_overall_and_none_elsewhere():
    groups = class_groups([200, 50])
    out = accuracy_metrics(torch.zeros(2), torch.zeros(2), groups, "val")
    assert out["val_acc"] == 0.0
    assert out["val_acc_many"] is None and out["val_acc_medium"] is None
    assert out["val_per_class_acc"] == [None, None]


# ---------------------------------------------------------------- classifier metrics from features

class TwoClassHead(nn.Module):
    """Identity features -> a fixed 2-class linear classifier (the `LTClassifier` interface used by metrics)."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # row norms 4 and 1

    def logits_from_features(self, feats, weight=None, bias=None):
        return nn.functional.linear(feats, self.classifier.weight if weight is None else weight)


def test_classifier_metrics_of_plain_and_tau_normalised_classifier_over_batches():
    model = TwoClassHead()
    # class 1 images at (1, 2): plain logits (4, 2) -> wrong; tau = 1 (unit rows) logits (1, 2) -> right
    feats = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    groups = {"head": [0], "tail": [1]}
    one_batch = classifier_metrics(model, {"val": [(feats, labels)]}, 1.0, groups)
    two_batches = classifier_metrics(model, {"val": [(feats[:1], labels[:1]), (feats[1:], labels[1:])]}, 1.0, groups)
    assert one_batch == two_batches
    assert one_batch["val_acc"] == pytest.approx(100 / 3) and one_batch["val_acc_tail"] == 0.0
    assert one_batch["tau_val_acc"] == pytest.approx(100.0)
    assert one_batch["classifier_norms"] == pytest.approx([4.0, 1.0])


def test_classifier_norms_after_lws_are_the_scaled_rows():
    """LWS (stage2.mode: lws) multiplies class c's logit by a learned s_c behind the frozen classifier, so the
    classifier in effect has rows s_c * w_c: the reported norms are |s_c| * ||w_c||, not the frozen ||w_c||."""
    model = TwoClassHead()
    model.logit_bn = ClassScale(2)
    with torch.no_grad():
        model.logit_bn.scale.copy_(torch.tensor([0.5, -3.0]))
    out = classifier_metrics(model, {"val": [(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))]}, 1.0, {})
    assert out["classifier_norms"] == pytest.approx([2.0, 3.0])  # 0.5 * 4 and |-3| * 1


def test_classifier_metrics_reduce_applies_to_the_counts_of_every_split():
    model = TwoClassHead()
    batch = [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))]  # one right prediction
    seen = []

    def other_rank_was_wrong(counts):  # as if a second rank added one wrong prediction of class 0
        seen.append(counts.clone())
        return counts + torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)

    out = classifier_metrics(model, {"val": batch, "test": batch}, 0.0, {}, reduce=other_rank_was_wrong)
    assert len(seen) == 2 and seen[0].shape == (4, 2)
    assert out["val_acc"] == out["test_acc"] == 50.0
