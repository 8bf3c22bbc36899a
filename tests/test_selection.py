"""Tests of ltsearch.selection: validation intervals, ties, the needed validation size and the choice by the
mean over seeds. Expected numbers are worked out by hand in the comments (z = 1.96), not by the code."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ltsearch.selection import (
    accuracy_interval,
    compare_with_best,
    confirmation_summary,
    decode_correct,
    encode_correct,
    mcnemar_counts,
    mcnemar_p,
    metric_group,
    needed_validation_size,
    pack_correct,
    resolution_note,
    seed_effect,
    t_quantile,
    tied,
    tied_with_best,
    unpack_correct,
    wilson_interval,
)


def test_wilson_interval_on_hand_worked_counts():
    # 50 of 100: centre (0.5 + 1.96^2/200) / (1 + 1.96^2/100) = 0.519208 / 1.038416 = 0.5;
    # half-width 1.96 * sqrt(0.25/100 + 1.96^2/40000) / 1.038416 = 1.96 * 0.0509513 / 1.038416 = 0.0961715
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-4)
    assert accuracy_interval(50.0, 100) == pytest.approx((40.383, 59.617), abs=0.01)
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.8416 / 13.8416] = [0, 0.27754]; never below 0 %
    assert accuracy_interval(0.0, 10) == pytest.approx((0.0, 27.754), abs=0.01)
    # the quick start's best trial, 30.5 % of 200 images (61 correct): p = 0.305,
    # centre (0.305 + 0.009604) / 1.019208 = 0.308676; half 1.96 * sqrt(0.305*0.695/200 + 3.8416/160000)
    # / 1.019208 = 1.96 * 0.0329224 / 1.019208 = 0.063312 -> [24.54, 37.20]: one image is half a point
    assert accuracy_interval(30.5, 200) == pytest.approx((24.536, 37.199), abs=0.01)
    # 10 of 10 is sound too: [10 / 13.8416, 1] = [72.25 %, 100 %]
    assert accuracy_interval(100.0, 10) == pytest.approx((72.246, 100.0), abs=0.01)


def test_interval_of_a_missing_value_or_size_is_missing():
    assert all(math.isnan(v) for v in accuracy_interval(float("nan"), 200))
    assert all(math.isnan(v) for v in accuracy_interval(30.0, 0))
    assert all(math.isnan(v) for v in accuracy_interval(30.0, None))


def test_ties_follow_newcombes_interval_of_the_difference():
    # the quick start's best two trials, 30.5 and 28.5 on 200 images: four images apart, tied
    assert tied(30.5, 28.5, 200, 200) and tied(28.5, 30.5, 200, 200)
    # 50 % vs 36 % on 100 images each: the best's lower distance 50 - 40.383 = 9.617; 36 of 100 has upper
    # bound (0.36 + 0.019208)/1.038416 + 1.96*sqrt(0.36*0.64/100 + 0.00009604)/1.038416 = 0.365178 + 0.092469
    # = 45.765 %, so 9.765 above; sqrt(9.617^2 + 9.765^2) = 13.705 < 14: resolved
    assert not tied(50.0, 36.0, 100, 100)
    # 37 of 100: upper bound 0.374806 + 0.092987 = 46.779 %, 9.779 above; sqrt(9.617^2 + 9.779^2) = 13.716 > 13
    assert tied(50.0, 37.0, 100, 100)
    # a gap of 20 points on 200 images is resolved
    assert not tied(60.0, 40.0, 200, 200)


def test_tie_marking_of_a_table():
    # 20 % of 200: upper bound (0.2 + 0.009604)/1.019208 + 1.96*sqrt(0.0008 + 0.000024)/1.019208
    # = 0.205655 + 0.055203 = 26.09 %, 6.09 above; the best 30.5 is 5.96 above its lower bound 24.54;
    # sqrt(5.96^2 + 6.09^2) = 8.52 < 10.5: resolved. No value: no verdict.
    marks = tied_with_best(pd.Series([28.5, 30.5, 20.0, None]), pd.Series([200, 200, 200, 200]))
    assert marks.tolist() == [True, True, False, pd.NA]
    # direction min: the best is the smallest value
    assert tied_with_best(pd.Series([10.0, 40.0]), pd.Series([200, 200]), "min").tolist() == [True, False]
    assert tied_with_best(pd.Series([30.0, 20.0]), pd.Series([None, None])).isna().all()


def test_needed_validation_size():
    # 2 z^2 p (1 - p) / D^2 with p = 0.305, D = 0.02: 2 * 3.8416 * 0.211975 / 0.0004 = 4071.6
    assert needed_validation_size(30.5, 2.0) == pytest.approx(4072, abs=1)
    # 50 %, 1 point: 2 * 3.8416 * 0.25 / 0.0001 = 19,208
    assert needed_validation_size(50.0, 1.0) == pytest.approx(19208, abs=2)


def test_resolution_note_says_the_size_needed_once_the_top_two_are_tied():
    values, sizes = pd.Series([27.0, 30.5, 10.0, 28.5]), pd.Series([200] * 4)
    note = resolution_note(values, sizes, classes=10)
    assert note.startswith("validation has 200 images: the best trial's 30.5 % has a 95% interval of 24.5-37.2 %")
    assert "3 of 4 trials (the best included) are statistically tied" in note  # 30.5, 28.5 and 27.0
    assert "2.0-point gap to the runner-up needs about 4,072 validation images (data.val_per_class: 408)" in note
    assert resolution_note(pd.Series([60.0, 40.0]), pd.Series([200, 200])) is None  # resolved: nothing to say
    assert resolution_note(pd.Series([60.0]), pd.Series([200])) is None
    # equal values: one image (0.5 points on 200) is the gap to resolve
    assert "0.5-point gap" in resolution_note(pd.Series([30.0, 30.0]), pd.Series([200, 200]))


def test_metric_group():
    assert metric_group("val_acc") == "overall" and metric_group("tau_val_acc") == "overall"
    assert metric_group("val_acc_few") == "few" and metric_group("best_tau_val_acc_tail") == "tail"
    assert metric_group("train_loss") is None and metric_group("val_loss") is None


def _runs(values: dict[str, list[float | None]]) -> pd.DataFrame:
    rows = []
    for trial_id, objectives in values.items():
        for seed, value in enumerate(objectives, start=1):
            rows.append({"confirmed_trial": trial_id, "seed": seed, "objective": value,
                         "status": "ERROR" if value is None else "TERMINATED",
                         "final_val_acc": value, "final_test_acc": None if value is None else value - 3})
    return pd.DataFrame(rows)


def test_confirmation_picks_the_best_mean_not_the_lucky_winner():
    """The search's winner `lucky` (highest single-seed validation, 60 in the search) re-trains to 50 and
    52; `steady` (58 in the search) to 57 and 59: the choice is `steady`, mean 58 against 51."""
    summary = confirmation_summary(_runs({"lucky": [50.0, 52.0], "steady": [57.0, 59.0], "mid": [54.0, 55.0]}))
    assert summary["confirmed_trial"].tolist() == ["steady", "mid", "lucky"]
    assert summary["confirm_rank"].tolist() == [1, 2, 3]
    best = summary.iloc[0]
    assert best["mean_objective"] == 58.0 and best["std_objective"] == pytest.approx(math.sqrt(2))  # ddof 1
    assert best["mean_test_acc"] == 55.0 and best["seeds"] == "1 2" and best["runs_ok"] == best["runs"] == 2


def test_confirmation_ranks_configurations_with_failed_seeds_last():
    summary = confirmation_summary(_runs({"flaky": [70.0, None], "steady": [57.0, 59.0], "dead": [None, None]}))
    assert summary["confirmed_trial"].tolist() == ["steady", "flaky", "dead"]
    flaky = summary.set_index("confirmed_trial").loc["flaky"]
    assert flaky["mean_objective"] == 70.0 and math.isnan(flaky["std_objective"]) and flaky["runs_ok"] == 1


def test_confirmation_follows_the_direction():
    runs = _runs({"a": [0.5, 0.7], "b": [0.2, 0.4]})
    assert confirmation_summary(runs, "min")["confirmed_trial"].tolist() == ["b", "a"]
    assert confirmation_summary(pd.DataFrame(columns=["confirmed_trial", "seed", "objective", "status"])).empty


def test_mcnemar_counts_and_exact_p_on_hand_worked_arrays():
    best = np.array([1, 1, 0, 0, 1], dtype=bool)
    other = np.array([1, 0, 0, 1, 1], dtype=bool)
    # image 1: only best right (b = 1); image 3: only other right (c = 1); images 0, 2, 4 agree
    assert mcnemar_counts(best, other) == (1, 1)
    # n = 2, k = 1: 2 (C(2,0) + C(2,1)) / 2^2 = 2 * 3 / 4 = 1.5 -> capped at 1
    assert mcnemar_p(1, 1) == 1.0
    assert mcnemar_p(0, 0) == 1.0  # never disagree: nothing tells them apart
    # n = 5, k = 0: 2 * 1 / 32 = 0.0625: five wins to none is not yet significant at 5 %
    assert mcnemar_p(5, 0) == pytest.approx(0.0625)
    # n = 6, k = 0: 2 / 64 = 0.03125
    assert mcnemar_p(0, 6) == pytest.approx(0.03125)
    # n = 20, k = 4: 2 (1 + 20 + 190 + 1140 + 4845) / 2^20 = 12392 / 1048576 = 0.0118179
    assert mcnemar_p(16, 4) == pytest.approx(0.0118179, abs=1e-7)
    # n = 10, k = 2: 2 (1 + 10 + 45) / 1024 = 0.109375
    assert mcnemar_p(8, 2) == pytest.approx(0.109375)
    # large counts stay exact and finite: 10,000 against 9,000 is far beyond noise, 5,000 each is not
    assert mcnemar_p(10_000, 9_000) < 1e-10
    assert mcnemar_p(5_000, 5_000) == 1.0
    with pytest.raises(ValueError, match="same images"):
        mcnemar_counts(best, other[:4])


def _ninety_percent_agreement() -> tuple[np.ndarray, np.ndarray]:
    """Two models on the same 200 images: A right on 80 (40 %), B on 68 (34 %); they disagree on 20
    images (90 % agreement): 16 only A gets right, 4 only B."""
    rng = np.random.default_rng(0)
    order = rng.permutation(200)
    a = np.zeros(200, dtype=bool)
    a[order[:80]] = True
    b = a.copy()
    b[order[:16]] = False  # A's wins
    b[order[80:84]] = True  # B's wins
    return a, b


def test_paired_rule_separates_what_the_unpaired_rule_calls_tied():
    a, b = _ninety_percent_agreement()
    assert (a == b).mean() == 0.9 and a.mean() == 0.40 and b.mean() == 0.34
    values, sizes = pd.Series([40.0, 34.0]), pd.Series([200, 200])
    # unpaired (Newcombe, as if scored on different images): 6 points on 200 images is within the noise
    assert tied(40.0, 34.0, 200, 200)
    assert tied_with_best(values, sizes).tolist() == [True, True]
    # paired: b = 16, c = 4, p = 0.0118 < 0.05
    compared = compare_with_best(values, sizes, correct=pd.Series([a, b]))
    assert compared["tied_with_best"].tolist() == [True, False]
    assert compared["tied_unpaired"].tolist() == [True, True]
    assert compared["tie_test"].tolist() == ["mcnemar", "mcnemar"]
    assert compared["only_best_right"].tolist() == [0, 16] and compared["only_trial_right"].tolist() == [0, 4]
    assert compared.at[1, "mcnemar_p"] == pytest.approx(0.0118179, abs=1e-7)
    # the note follows the rule: the top two are resolved by the paired test, so nothing to say
    assert resolution_note(values, sizes) is not None
    assert resolution_note(values, sizes, correct=pd.Series([a, b])) is None


def test_rows_without_predictions_fall_back_to_the_unpaired_rule():
    a, b = _ninety_percent_agreement()
    values, sizes = pd.Series([40.0, 34.0, 39.0]), pd.Series([200, 200, 200])
    compared = compare_with_best(values, sizes, correct=pd.Series([a, None, a]))
    assert compared["tie_test"].tolist() == ["mcnemar", "newcombe", "mcnemar"]
    assert compared["tied_with_best"].tolist() == [True, True, True]  # 34 % unpaired: tied; 39 % == a: p = 1
    assert pd.isna(compared.at[1, "mcnemar_p"])
    # the best without predictions: every row is judged unpaired
    assert set(compare_with_best(values, sizes, correct=pd.Series([None, b, a]))["tie_test"]) == {"newcombe"}
    note = resolution_note(values, sizes, correct=pd.Series([a, None, a]))
    assert "3 of 3 trials" in note and "McNemar's paired test" in note
    assert "(3 by the unpaired interval; 1 without predictions judged unpaired)" in note


def test_correctness_packs_to_a_bit_an_image_and_round_trips():
    correct = np.random.default_rng(1).random((2, 20_000)) < 0.5  # ImageNet-LT's validation set, 2 classifiers
    packed = pack_correct(correct)
    assert packed.dtype == np.uint8 and packed.shape == (2, 2_500)  # 2,500 bytes per classifier
    assert (unpack_correct(packed, 20_000) == correct).all()
    record = encode_correct(correct[:, :203])  # not a multiple of 8
    assert (decode_correct(record) == correct[:, :203]).all()
    assert len(encode_correct(correct)["bits"]) == 6_668  # base64 of 5,000 bytes, in an Optuna user attribute


@pytest.mark.parametrize("confidence, df, expected", [  # Student's t table (two-sided)
    (0.95, 1, 12.706), (0.95, 2, 4.303), (0.95, 3, 3.182), (0.95, 4, 2.776), (0.95, 10, 2.228),
    (0.95, 30, 2.042), (0.99, 3, 5.841), (0.90, 5, 2.015)])
def test_t_quantile_matches_the_table(confidence, df, expected):
    assert t_quantile(confidence, df) == pytest.approx(expected, abs=1e-3)


def test_seed_effect_is_a_paired_t_interval_on_hand_worked_values():
    # differences by seed: 6.0, 4.5, 8.0 -> mean 6.1667, sample std sqrt(6.1667 / 2) = 1.7559,
    # half-width 4.3027 * 1.7559 / sqrt(3) = 4.3620
    effect = seed_effect({0: 68.0, 1: 67.0, 2: 69.0, 3: 70.0}, {0: 62.0, 1: 62.5, 2: 61.0})
    assert effect["seeds"] == [0, 1, 2] and effect["n"] == 3  # seed 3 has no partner
    assert effect["mean"] == pytest.approx(6.1667, abs=1e-4)
    assert effect["std"] == pytest.approx(1.7559, abs=1e-4)
    assert (effect["lo"], effect["hi"]) == pytest.approx((1.8047, 10.5287), abs=1e-4)
    assert effect["survives"]


def test_seed_effect_pairing_separates_what_unpaired_spread_hides():
    # seed moves both methods together (a shared 6-point spread) while A beats B by 1 point at every seed:
    # the paired interval is [1, 1] and survives; the unpaired spread of each method would swamp it
    a, b = {0: 61.0, 1: 67.0, 2: 64.0}, {0: 60.0, 1: 66.0, 2: 63.0}
    effect = seed_effect(a, b)
    assert effect["mean"] == pytest.approx(1.0) and effect["std"] == pytest.approx(0.0, abs=1e-12)
    assert effect["survives"]
    assert np.std(list(a.values()), ddof=1) == pytest.approx(3.0)


def test_seed_effect_says_nothing_from_one_seed_and_keeps_an_interval_across_zero():
    one = seed_effect({0: 70.0}, {0: 60.0})
    assert one["n"] == 1 and one["mean"] == 10.0 and math.isnan(one["lo"]) and not one["survives"]
    mixed = seed_effect({0: 70.0, 1: 60.0}, {0: 65.0, 1: 64.0})  # +5 and -4
    assert mixed["lo"] < 0 < mixed["hi"] and not mixed["survives"]
    negative = seed_effect({0: 60.0, 1: 61.0, 2: 60.5}, {0: 65.0, 1: 65.5, 2: 66.0})
    assert negative["hi"] < 0 and negative["survives"]
