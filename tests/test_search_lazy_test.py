"""`ltsearch.search.lazy_test`: ASHA's rungs, the trials' lazy-test config, the selected trials, and the best-epoch
test figures recomputed from a stopped trial's checkpoint (synthetic CIFAR-10, CPU; the Ray dispatch replaced by
an in-process call)."""
from __future__ import annotations

import io
import shutil

import pandas as pd
import pytest
import torch
import yaml

from ltsearch.config import ExperimentConfig, with_overrides
from ltsearch.files import CHECKPOINT_FILE
from ltsearch.search import lazy_test
from ltsearch.search.lazy_test import asha_rungs, fill_best_test, lazy_test_config, selected_trials
from ltsearch.search.results import trial_row
from ltsearch.space import Scheduler, SearchSettings, load_search_space
from ltsearch.train import train


@pytest.mark.parametrize(("grace", "factor", "horizon", "rungs"), [
    (1, 2, 16, [1, 2, 4, 8, 16]),  # 16 = 1 * 2**4: log2(16) + 1 = 5 milestones
    (2, 2, 16, [2, 4, 8, 16]),  # the 12 + 4 joint search of benchmarks/lazy_test_eval.py
    (1, 2, 5, [1, 2, 4]),  # log2(5) + 1 = 3.3: 3 milestones; 8 is past the horizon
    (2, 3, 20, [2, 6, 18]),  # log3(10) + 1 = 3.1
    (2, 1.5, 8, [2, 3, 5, 7]),  # milestones 2, 3, 4.5, 6.75: a trial reports whole epochs, so 5 and 7
    (8, 2, 8, [8]),
])
def test_asha_rungs_by_hand(grace, factor, horizon, rungs):
    assert asha_rungs(Scheduler(grace_period=grace, reduction_factor=factor), horizon) == rungs


def test_asha_rungs_are_where_rays_asha_decides():
    """Ray's own bracket: a trial is compared at the first reported epoch that reaches a milestone."""
    import math

    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace in (1, 2, 3, 5):
        for factor in (1.5, 2, 2.5, 3, 4):
            for horizon in range(grace, 61):
                milestones = _Bracket(min_t=grace, max_t=horizon, reduction_factor=factor, s=0)._rungs
                ours = asha_rungs(Scheduler(grace_period=grace, reduction_factor=factor), horizon)
                assert ours == sorted(math.ceil(m) for m, _ in milestones), (grace, factor, horizon)


def test_no_asha_no_rungs():
    assert asha_rungs(Scheduler(enabled=False), 16) == []


def test_a_phase_base_tests_at_the_rungs_unless_told_otherwise():
    base = ExperimentConfig()
    assert base.trainer.test_every == "auto"
    lazy = lazy_test_config(base, [2, 4])
    assert (lazy.trainer.test_every, lazy.trainer.test_epochs) == ("rungs", [2, 4])
    own = with_overrides(base, {"trainer.test_every": "rungs", "trainer.test_epochs": [3]})
    assert lazy_test_config(own, [2, 4]).trainer.test_epochs == [2, 3, 4]
    for kept in ("best", "epoch"):
        config = with_overrides(base, {"trainer.test_every": kept})
        assert lazy_test_config(config, [2, 4]) == config
    assert lazy_test_config(base, []).trainer.test_epochs == []  # no ASHA: stage ends only


def test_selected_trials():
    table = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": "TERMINATED", "epochs": [4, 2, 4],
                          "final_val_acc": [50.0, 60.0, 40.0], "best_val_acc": [70.0, 60.0, 65.0]})
    assert selected_trials(table, SearchSettings()) == [1]
    assert selected_trials(table, SearchSettings(confirm={"top_k": 2, "seeds": [1]})) == [1, 0]
    staged = pd.concat([table.assign(phase="stage1"), table.assign(phase="stage2", trial_id=["x", "y", "z"])],
                       ignore_index=True)
    assert selected_trials(staged, SearchSettings(staged={"top_k": 2})) == [0, 2]  # parents: by best_val_acc


class _Stopped(Exception):
    pass


def test_a_selected_trial_asha_stopped_gets_its_best_epoch_test_figures(cifar10_root, tmp_path, monkeypatch,
                                                                       capsys):
    """A trial stopped at a rung whose best-by-validation epoch came before it, untested: the driver recomputes
    that epoch's test figures from the kept checkpoint, exactly those `test_every: epoch` reported for it, fills
    the results row, and writes them into the checkpoint's best metrics (the per-class figure reads them)."""
    space = {"base": {"data": {"dataset": "cifar10", "root": str(cifar10_root), "imbalance_factor": 10,
                               "val_per_class": 5},
                      "model": {"name": "resnet8"}, "stage1": {"epochs": 6, "batch_size": 32, "lr": 0.05},
                      "stage2": {"enabled": False}, "trainer": {"eval_batch_size": 64, "num_threads": 2}},
             "space": {"stage1.weight_decay": {"loguniform": [1e-4, 1e-1]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    spec = load_search_space(tmp_path / "s.yaml")
    config = with_overrides(spec.base, {"stage1.weight_decay": 5e-4})
    eager = train(with_overrides(config, {"trainer.test_every": "epoch"}))["history"]

    def best_before(stop):
        return max(eager[:stop], key=lambda h: (h["val_acc"], -h["epoch"]))["epoch"]

    # ASHA settings with a rung, short of the end, whose best epoch so far is no rung (for this validation curve)
    found = [(rungs, r) for g, f in ((1, 2), (1, 3), (2, 2), (1, 5), (2, 4))
             for rungs in [asha_rungs(Scheduler(grace_period=g, reduction_factor=f), 6)]
             for r in rungs if r < 6 and best_before(r) not in rungs]
    assert found, f"validation peaks at a rung for every setting tried: {[h['val_acc'] for h in eager]}"
    rungs, stop = found[0]
    reports, checkpoint = [], tmp_path / "checkpoint"

    def report(metrics, folder):  # Tune's side: keep the checkpoint; ASHA stops the trial at `stop`
        reports.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(folder, checkpoint)
        if metrics["epoch"] == stop:
            raise _Stopped

    with pytest.raises(_Stopped):
        train(lazy_test_config(config, rungs), report=report)
    frame = pd.DataFrame(reports)
    assert list(frame["has_test"]) == [e in rungs for e in frame["epoch"]]
    row = trial_row("t1", {"stage1.weight_decay": 5e-4}, frame, None, spec.search, 6, "ASHA")
    best = eager[row["best_epoch"] - 1]
    assert row["best_epoch"] == best_before(stop) and pd.isna(row["best_test_acc"])
    assert row["final_test_acc"] == eager[stop - 1]["test_acc"]  # stopped at a rung: its last epoch has them
    table = pd.DataFrame([{**row, "checkpoint": str(checkpoint)}])
    assert selected_trials(table, spec.search) == [0]

    calls = []

    def in_process(jobs, worker):
        calls.append((jobs, worker))
        return {i: lazy_test.best_test(*job) for i, job in jobs.items()}

    monkeypatch.setattr(lazy_test, "_run_tasks", in_process)
    filled = fill_best_test(table, [0], spec, {"CPU": 2.0})
    for column in ("test_acc", "test_acc_head", "test_acc_tail", "tau_test_acc", "tau_test_acc_middle"):
        assert filled.at[0, f"best_{column}"] == best[column], column
    assert pd.isna(table.at[0, "best_test_acc"])  # the caller's table is left as it was
    assert calls[0][1] == {"CPU": 1.0, "GPU": 0.0}  # one trial worker's resources
    state = torch.load(io.BytesIO((checkpoint / CHECKPOINT_FILE).read_bytes()), weights_only=False)
    kept = state["best"][1]["metrics"]
    assert kept["recomputed_test"] and kept["has_test"] and kept["epoch"] == best["epoch"]
    assert kept["test_acc"] == best["test_acc"] and len(kept["test_per_class_acc"]) == 10
    assert f"best epochs [{best['epoch']}]" in capsys.readouterr().out
    again = fill_best_test(filled, [0], spec, {"CPU": 2.0})  # a stopped trial is looked at again: nothing to do
    assert len(calls) == 2 and again.equals(filled) and "recomputed" not in capsys.readouterr().out
