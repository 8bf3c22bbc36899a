"""`ltsearch.search.staged`'s stage 1 taken from a finished `python -m ltsearch train` run (no Ray started)."""
from __future__ import annotations

import pytest

from ltsearch.config import ConfigError, with_overrides
from ltsearch.space import load_search_space

from .conftest import write_space


@pytest.fixture(scope="module")
def finished_run(cifar10_root, tmp_path_factory):
    """A 2-epoch stage-1 run on the synthetic CIFAR-10 folder, as `python -m ltsearch train --out` leaves it."""
    from ltsearch.train import train

    folder = tmp_path_factory.mktemp("stage1_run")
    spec = load_search_space(write_space(folder / "s.yaml", cifar10_root, stage1_epochs=2, space={},
                                         search={}))
    train(with_overrides(spec.base, {"stage2.enabled": False}), out_dir=folder / "run")
    return folder / "run"


def _spec(tmp_path, cifar10_root, run, stage1_epochs=2):
    return load_search_space(write_space(
        tmp_path / "s.yaml", cifar10_root, stage1_epochs=stage1_epochs, stage2_epochs=2,
        space={"stage2.weight_decay": {"loguniform": [1e-3, 1.0]}},
        search={"mode": "staged", "staged": {"stage1_run": str(run)}}))


def test_finished_run_becomes_the_one_stage1_trial(finished_run, cifar10_root, tmp_path):
    from ltsearch.search.staged import STAGE1_RUN, finished_stage1_run

    table, history = finished_stage1_run(_spec(tmp_path, cifar10_root, finished_run))
    assert list(table["trial_id"]) == [STAGE1_RUN]
    assert table.loc[0, "stop_reason"] == "completed" and table.loc[0, "epochs"] == 2
    assert table.loc[0, "checkpoint"] == str(finished_run / "checkpoint")
    assert list(history["epoch"]) == [1, 2]
    best = history.loc[history["val_acc"].idxmax()]
    assert table.loc[0, "best_val_acc"] == best["val_acc"] and table.loc[0, "best_epoch"] == best["epoch"]


def test_finished_run_trained_otherwise_than_base_is_refused(finished_run, cifar10_root, tmp_path):
    from ltsearch.search.staged import finished_stage1_run

    with pytest.raises(ConfigError, match=r"stage1\.epochs=2, but the space's base has 3"):
        finished_stage1_run(_spec(tmp_path, cifar10_root, finished_run, stage1_epochs=3))


def test_unfinished_run_is_refused(cifar10_root, tmp_path):
    import torch

    from ltsearch.files import CHECKPOINT_FILE
    from ltsearch.search.staged import finished_stage1_run
    from ltsearch.train import train

    spec = load_search_space(write_space(tmp_path / "a.yaml", cifar10_root, stage1_epochs=1, space={}, search={}))
    train(with_overrides(spec.base, {"stage2.enabled": False}), out_dir=tmp_path / "run")
    path = tmp_path / "run" / "checkpoint" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=False)
    state["config"]["stage1"]["epochs"] = 2  # as if stopped after epoch 1 of 2
    torch.save(state, path)
    with pytest.raises(ConfigError, match="is not a finished stage 1 .*epoch 1 of 2.*--resume"):
        finished_stage1_run(_spec(tmp_path, cifar10_root, tmp_path / "run"))


def test_missing_run_names_the_checkpoint_file(cifar10_root, tmp_path):
    from ltsearch.search.staged import finished_stage1_run

    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere" / "checkpoint" / "state.pt")):
        finished_stage1_run(_spec(tmp_path, cifar10_root, tmp_path / "nowhere"))


def test_stage2_and_stage1_predictions_reach_the_tie_test_and_survive_a_resumed_study(finished_run, cifar10_root,
                                                                                      tmp_path):
    """A stage-2 trial's per-image validation correctness, stored in its Optuna trial as the phase stores it,
    is read back from the reloaded study (what --resume does) into its results row, and the finished stage-1
    run's from the file beside its checkpoint; results.csv never holds the record itself."""
    import numpy as np
    import optuna
    import pandas as pd

    from ltsearch.search.experiment import _validation_correct
    from ltsearch.search.results import VAL_CORRECT, add_validation_noise
    from ltsearch.search.staged import STAGE1_TRIAL, finished_stage1_run, stage2_tables
    from ltsearch.selection import encode_correct

    spec = _spec(tmp_path, cifar10_root, finished_run)
    images = 50  # 5 validation images x 10 classes
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="stage2", storage=storage)
    correct = np.zeros((2, images), dtype=bool)
    correct[:, :20] = True  # 40 %
    for number, right in enumerate((20, 10)):
        trial = study.ask()
        trial.suggest_categorical(STAGE1_TRIAL, ["stage1_run"])
        trial.suggest_float("stage2.weight_decay", 1e-3, 1.0, log=True)
        kept = correct.copy()
        kept[:, right:] = False
        trial.set_user_attr(VAL_CORRECT, encode_correct(kept))
        trial.set_user_attr("history", [{"epoch": 1, "val_acc": 2.0 * right}, {"epoch": 2, "val_acc": 2.0 * right}])
        trial.set_user_attr("per_class", {})
        study.tell(trial, 2.0 * right)
    resumed = optuna.load_study(study_name="stage2", storage=storage)
    table2, _ = stage2_tables(resumed, spec, ["stage2.weight_decay"])
    table1, _ = finished_stage1_run(spec)
    table = pd.concat([table1.assign(phase="stage1"), table2.assign(phase="stage2")], ignore_index=True)
    records = _validation_correct(spec, table, images)
    assert records[0]["last"].shape == records[0]["best"].shape == (2, images)  # from val_predictions.npy
    assert 100 * records[0]["best"][0].mean() == pytest.approx(table.at[0, "best_val_acc"])
    assert (records[1]["last"][0] == correct[0]).all() and records[2]["last"][0].sum() == 10
    table = table.drop(columns=VAL_CORRECT)
    noisy, note = add_validation_noise(table, spec.search, [{"overall": images}] * 3, correct=records)
    assert noisy["tie_test"].tolist() == ["mcnemar"] * 3
    assert (noisy.at[2, "only_best_right"], noisy.at[2, "only_trial_right"]) == (10, 0)
    assert noisy.at[2, "mcnemar_p"] == pytest.approx(2 / 2**10)  # 40 % against 20 %: separated
    assert not noisy.at[2, "tied_with_best"] and note is None
