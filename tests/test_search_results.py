"""Tests of ltsearch.search.results: result rows, stop reasons and ranking, on hand-made frames."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ltsearch.config import ExperimentConfig
from ltsearch.search.results import (
    add_validation_noise,
    best_row,
    planned_epochs,
    rank_trials,
    sampled_values,
    selection_rows,
    stage_summary,
    trial_row,
)
from ltsearch.space import SearchSettings

MAX = SearchSettings()
MIN_LOSS = SearchSettings(metric="train_loss", direction="min")


def frame(val_accs, **extra) -> pd.DataFrame:
    rows = [{"epoch": e + 1, "val_acc": v, "test_acc": 10.0 * (e + 1), "train_loss": 1.0 / (e + 1)}
            for e, v in enumerate(val_accs)]
    return pd.DataFrame(rows).assign(**extra)


def test_planned_epochs_counts_stage2_only_when_enabled():
    config = ExperimentConfig.model_validate({"stage1": {"epochs": 7}, "stage2": {"epochs": 3}})
    assert planned_epochs(config) == 10
    off = ExperimentConfig.model_validate({"stage1": {"epochs": 7}, "stage2": {"enabled": False, "epochs": 3}})
    assert planned_epochs(off) == 7


def test_row_has_final_and_best_by_validation_metrics():
    row = trial_row("t1", {"stage1.lr": 0.1}, frame([50.0, 70.0, 60.0]), None, MAX, planned=3, pruner="ASHA")
    assert row["final_val_acc"] == 60.0 and row["final_test_acc"] == 30.0
    assert row["best_epoch"] == 2 and row["best_val_acc"] == 70.0 and row["best_test_acc"] == 20.0
    assert row["objective"] == 60.0 and row["stop_reason"] == "completed" and row["stage1.lr"] == 0.1


def test_a_best_epoch_without_test_figures_takes_those_its_stage_end_carried():
    """`trainer.test_every: rungs`: epoch 2 (the best) had no test pass; the stage's last epoch evaluated its
    kept model and reported the figures as best_test_* beside best_epoch."""
    f = frame([50.0, 70.0, 60.0], best_epoch=[1, 2, 2])
    f.loc[1, "test_acc"] = math.nan
    f["best_test_acc"] = [math.nan, math.nan, 21.5]
    row = trial_row("t1", {}, f, None, MAX, planned=3, pruner="ASHA")
    assert row["best_epoch"] == 2 and row["best_test_acc"] == 21.5 and row["final_test_acc"] == 30.0
    f["best_epoch"] = [1, 1, 1]  # figures carried for another epoch are not this one's
    assert math.isnan(trial_row("t1", {}, f, None, MAX, planned=3, pruner="ASHA")["best_test_acc"])


def test_stop_reason_is_judged_against_the_trials_own_schedule():
    """Bug: with stage1.epochs searched, a 3-epoch trial that finished was 'stopped early' against the
    space's longest schedule."""
    short = trial_row("t", {}, frame([1.0, 2.0, 3.0]), None, MAX, planned=3, pruner="ASHA")
    assert short["stop_reason"] == "completed"
    stopped = trial_row("t", {}, frame([1.0, 2.0]), None, MAX, planned=6, pruner="ASHA")
    assert stopped["stop_reason"] == "stopped early by ASHA at epoch 2"


def test_rows_of_a_phase_without_early_stopping_never_blame_asha():
    """Bug: staged mode's stage-2 rows read 'stopped early by ASHA' although that phase has no ASHA."""
    row = trial_row("stage2_00001", {}, frame([1.0]), None, MAX, planned=2, pruner=None)
    assert "ASHA" not in row["stop_reason"] and row["stop_reason"] == "incomplete: 1 of 2 epochs"


def test_error_and_divergence_rows():
    error = trial_row("t", {}, None, "RuntimeError: boom", MAX, planned=3, pruner="ASHA")
    assert error["status"] == "ERROR" and error["stop_reason"] == "RuntimeError: boom" and error["epochs"] == 0
    diverged = frame([math.nan], diverged=["stage 1 epoch 1: training loss is nan"])
    row = trial_row("t", {}, diverged, None, MAX, planned=3, pruner="ASHA")
    assert row["stop_reason"] == "diverged: stage 1 epoch 1: training loss is nan"


def test_without_a_validation_set_the_best_epoch_is_the_last():
    """Bug (staged mode): with no validation set the row had no best_* values and ranking stage 1 failed."""
    no_val = frame([0.0, 0.0]).drop(columns="val_acc")
    row = trial_row("t", {}, no_val, None, MIN_LOSS, planned=2, pruner="ASHA")
    assert row["best_epoch"] == 2 and row["best_train_loss"] == 0.5


def table() -> pd.DataFrame:
    return pd.DataFrame([
        {"trial_id": "a", "status": "TERMINATED", "epochs": 4, "final_val_acc": 60.0, "best_val_acc": 70.0,
         "final_train_loss": 0.5, "best_train_loss": 0.9},
        {"trial_id": "b", "status": "TERMINATED", "epochs": 4, "final_val_acc": 65.0, "best_val_acc": 66.0,
         "final_train_loss": 0.2, "best_train_loss": 0.1},
        {"trial_id": "c", "status": "ERROR", "epochs": 1, "final_val_acc": 99.0, "best_val_acc": 99.0,
         "final_train_loss": 0.0, "best_train_loss": 0.0},
        {"trial_id": "d", "status": "TERMINATED", "epochs": 2, "final_val_acc": math.nan,
         "best_val_acc": math.nan, "final_train_loss": math.nan, "best_train_loss": math.nan},
    ])


def test_ranking_follows_the_metric_the_direction_and_the_column():
    """Bug: staged mode picked its stage-1 parents by best_val_acc whatever the configured metric."""
    assert list(rank_trials(table(), MAX)["trial_id"]) == ["b", "a"]
    assert list(rank_trials(table(), MAX, "best")["trial_id"]) == ["a", "b"]
    assert list(rank_trials(table(), MIN_LOSS, "best")["trial_id"]) == ["b", "a"]


def test_best_row_is_a_stage2_row_in_staged_mode():
    staged = table().assign(phase=["stage1", "stage2", "stage2", "stage1"])
    assert best_row(staged, MAX)["trial_id"] == "b"
    assert best_row(table().iloc[2:], MAX) is None


def test_sampled_values_skip_keys_a_condition_left_out():
    row = pd.Series({"stage1.lr": 0.1, "model.nbn_all_bn": math.nan})
    assert sampled_values(row, ["stage1.lr", "model.nbn_all_bn", "absent"]) == {"stage1.lr": pytest.approx(0.1)}


def noisy_table() -> pd.DataFrame:
    """Four trials of a quick-start-sized validation set (200 images, 20 per class)."""
    return pd.DataFrame([
        {"trial_id": "a", "status": "TERMINATED", "epochs": 6, "objective": 30.5, "final_val_acc": 30.5,
         "best_val_acc": 31.0},
        {"trial_id": "b", "status": "TERMINATED", "epochs": 6, "objective": 28.5, "final_val_acc": 28.5,
         "best_val_acc": 28.5},
        {"trial_id": "c", "status": "TERMINATED", "epochs": 2, "objective": 12.0, "final_val_acc": 12.0,
         "best_val_acc": 12.0},
        {"trial_id": "d", "status": "ERROR", "epochs": 0, "objective": math.nan, "final_val_acc": math.nan,
         "best_val_acc": math.nan},
    ])


IMAGES = {"overall": 200, "many": 60, "medium": 140, "few": 0, "head": 60, "middle": 80, "tail": 60}


def test_validation_noise_columns_ties_and_note():
    table, note = add_validation_noise(noisy_table(), MAX, [IMAGES] * 4, classes=10)
    rows = table.set_index("trial_id")
    assert rows["val_images"].tolist() == [200] * 4
    # 61 of 200 (hand-worked in test_selection): [24.54, 37.20]
    assert (rows.at["a", "objective_lo"], rows.at["a", "objective_hi"]) == pytest.approx((24.54, 37.20), abs=0.01)
    assert rows.at["a", "best_val_acc_lo"] < 31.0 < rows.at["a", "best_val_acc_hi"]
    assert math.isnan(rows.at["d", "objective_lo"])
    assert rows["tied_with_best"].tolist()[:3] == [True, True, False] and pd.isna(rows.at["d", "tied_with_best"])
    assert note.startswith("validation has 200 images") and "2 of 3 trials" in note
    assert "(data.val_per_class: 408)" in note


def test_validation_noise_of_a_group_objective_and_of_a_loss():
    few = SearchSettings(metric="val_acc_tail")
    table, _ = add_validation_noise(noisy_table(), few, [IMAGES] * 4)
    assert table["val_images"].tolist() == [60] * 4  # the tail third's 3 classes x 20 images
    assert table.at[0, "objective_hi"] - table.at[0, "objective_lo"] > 20  # +-11 points on 60 images
    table, note = add_validation_noise(noisy_table().assign(objective=[0.3, 0.2, 0.1, math.nan]), MIN_LOSS,
                                       [IMAGES] * 4)
    assert table["objective_lo"].isna().all() and table["tied_with_best"].isna().all() and note is None
    assert table["final_val_acc_lo"].notna().sum() == 3  # validation accuracy keeps its interval


def test_staged_ties_are_per_phase_and_stage1_is_judged_at_its_best_epoch():
    staged = noisy_table().assign(phase=["stage1", "stage1", "stage2", "stage2"],
                                  best_val_acc=[10.0, 40.0, 12.0, math.nan])
    table, note = add_validation_noise(staged, MAX, [IMAGES] * 4)
    # stage 1 ranks parents by best_val_acc: 40 against 10 is resolved; stage 2 has one trial with a value
    assert table["tied_with_best"].tolist()[:3] == [False, True, True]
    assert note is None


def _predictions(accuracy_pairs) -> list[dict]:
    """Per row {"last": (2, 200) bool} with the classifier right on the first k images and the tau-normalised
    one on the first j: rows with nested right sets disagree on exactly |k - k'| images, all one way."""
    out = []
    for k, j in accuracy_pairs:
        correct = np.zeros((2, 200), dtype=bool)
        correct[0, :k], correct[1, :j] = True, True
        out.append({"last": correct, "best": correct[::-1].copy()})
    return out


def test_paired_ties_use_the_predictions_of_the_value_each_phase_ranks():
    # a: 61 of 200 (30.5 %), b: 57 (28.5 %): b's right images are all a's, so b = 4, c = 0: p = 2/16 = 0.125
    records = pd.Series(_predictions([(61, 61), (57, 57), (24, 24), (0, 0)]))
    table, note = add_validation_noise(noisy_table(), MAX, [IMAGES] * 4, correct=records)
    rows = table.set_index("trial_id")
    assert rows["tie_test"].tolist()[:3] == ["mcnemar"] * 3 and pd.isna(rows.at["d", "tie_test"])
    assert rows["tied_with_best"].tolist()[:3] == [True, True, False]
    assert (rows.at["b", "only_best_right"], rows.at["b", "only_trial_right"]) == (4, 0)
    assert rows.at["b", "mcnemar_p"] == pytest.approx(0.125)
    assert "2 of 3 trials" in note and "McNemar's paired test" in note and "(2 by the unpaired interval)" in note
    # 30.5 % against 26.5 % (53 images, nested): unpaired tied, paired b = 8, c = 0: p = 2/256, separated
    table, note = add_validation_noise(noisy_table().assign(objective=[30.5, 26.5, 12.0, math.nan]), MAX,
                                       [IMAGES] * 4, correct=pd.Series(_predictions([(61, 0), (53, 0), (24, 0),
                                                                                     (0, 0)])))
    assert table["tied_unpaired"].tolist()[:2] == [True, True]
    assert table["tied_with_best"].tolist()[:2] == [True, False] and note is None
    # a tau objective compares the tau-normalised rows; the stage-1 phase its best-by-validation epoch's
    tau = SearchSettings(metric="tau_val_acc")
    table, _ = add_validation_noise(noisy_table(), tau, [IMAGES] * 4,
                                    correct=pd.Series(_predictions([(0, 61), (0, 53), (0, 24), (0, 0)])))
    assert table.at[1, "only_best_right"] == 8
    staged = noisy_table().assign(phase=["stage1", "stage1", "stage2", "stage2"], best_val_acc=[30.5, 26.5, 12, 0])
    table, _ = add_validation_noise(staged, MAX, [IMAGES] * 4,
                                    correct=pd.Series(_predictions([(0, 61), (0, 53), (24, 0), (0, 0)])))
    assert table.at[1, "only_best_right"] == 8 and not table.at[1, "tied_with_best"]


def test_paired_ties_of_a_group_objective_count_the_groups_images_only():
    records = pd.Series(_predictions([(61, 61), (53, 53), (24, 24), (0, 0)]))
    tail = np.zeros(200, dtype=bool)
    tail[:50] = True  # a and b are both right on all 50: their 8 discordant images lie outside the tail
    table, _ = add_validation_noise(noisy_table(), SearchSettings(metric="val_acc_tail"), [IMAGES] * 4,
                                    correct=records, val_groups={"tail": tail})
    assert table.at[1, "only_best_right"] == 0 and table.at[1, "mcnemar_p"] == 1.0
    # without the group's images the rows fall back to the unpaired rule
    table, _ = add_validation_noise(noisy_table(), SearchSettings(metric="val_acc_tail"), [IMAGES] * 4,
                                    correct=records)
    assert set(table["tie_test"].dropna()) == {"newcombe"}


def test_selection_rows_leave_confirmation_rows_out():
    joint = table().assign(phase=["search", "search", "search", "confirm"])
    assert selection_rows(joint)["trial_id"].tolist() == ["a", "b", "c"]
    staged = table().assign(phase=["stage1", "stage2", "stage2", "confirm"])
    assert selection_rows(staged)["trial_id"].tolist() == ["b", "c"]
    assert best_row(joint.assign(final_val_acc=[1.0, 2.0, 3.0, 99.0]), MAX)["trial_id"] == "b"


def _staged_table() -> pd.DataFrame:
    """Two stage-1 trials (s1_b best on validation) and two stage-2 trials on s1_b (t2_a best on validation)."""
    def groups(when, overall, head, middle, tail, tau=0.0):
        return {f"{when}_test_acc": overall, f"{when}_test_acc_head": head, f"{when}_test_acc_middle": middle,
                f"{when}_test_acc_tail": tail, f"{when}_tau_test_acc": overall + tau,
                f"{when}_tau_test_acc_head": head, f"{when}_tau_test_acc_middle": middle,
                f"{when}_tau_test_acc_tail": tail + tau}
    rows = [
        {"phase": "stage1", "trial_id": "s1_a", "best_val_acc": 40.0, "best_tau_val_acc": 40.0,
         **groups("best", 39.0, 80.0, 30.0, 1.0)},
        {"phase": "stage1", "trial_id": "s1_b", "best_val_acc": 45.0, "best_tau_val_acc": 45.0,
         **groups("best", 44.0, 90.0, 35.0, 2.5, tau=3.0)},
        {"phase": "stage2", "trial_id": "t2_a", "stage1_trial": "s1_b", "final_val_acc": 55.0,
         "final_tau_val_acc": 55.0, **groups("final", 54.0, 80.0, 45.0, 40.0, tau=1.0)},
        {"phase": "stage2", "trial_id": "t2_b", "stage1_trial": "s1_b", "final_val_acc": 50.0,
         "final_tau_val_acc": 56.0, **groups("final", 49.0, 70.0, 40.0, 38.0, tau=10.0)},
    ]
    table = pd.DataFrame(rows).assign(status="TERMINATED", epochs=2)
    table["objective"] = table["final_val_acc"]
    return table


def test_stage_summary_compares_the_best_stage1_and_final_models_by_group():
    first, final, change = stage_summary(_staged_table(), MAX)
    assert first.startswith("best stage-1 model  s1_b") and "test 44.0 % (head 90.0, middle 35.0, tail 2.5)" in first
    assert final.startswith("best final model    t2_a (stage 2 on s1_b") and "(head 80.0, middle 45.0, tail 40.0)" in final
    assert "overall +10.0, head -10.0, middle +10.0, tail +37.5" in change


def test_stage_summary_on_a_tau_metric_reports_the_tau_normalised_models():
    table = _staged_table()
    table["objective"] = table["final_tau_val_acc"]
    first, final, change = stage_summary(table, SearchSettings(metric="tau_val_acc"))
    assert "test 47.0 %" in first and "tail 5.5" in first  # s1_b's tau-normalised figures
    assert final.startswith("best final model    t2_b") and "test 59.0 %" in final and "tail 48.0" in final
    assert "overall +12.0" in change and "tail +42.5" in change


def test_stage_summary_is_empty_without_a_staged_result():
    assert stage_summary(table(), MAX) == []  # a joint search
    only_stage1 = _staged_table().iloc[:2]
    assert stage_summary(only_stage1, MAX) == []
