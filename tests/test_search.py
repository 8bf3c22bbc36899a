"""Searches on a real local Ray (started in this process) over small synthetic CIFAR-10 folders (end-to-end)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ltsearch.space import load_search_space

from .conftest import write_space

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_search_writes_results_and_asha_stops_trials(local_ray, cifar10_root, tmp_path):
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=4, stage2_epochs=1, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-1]},
        "stage1.lr": {"choice": [0.05, 3.0]},  # lr 3.0 learns nothing: ASHA has something to stop
    }, search={"num_samples": 6, "scheduler": {"grace_period": 1, "reduction_factor": 2},
               "sampler": {"type": "random", "seed": 0}, "max_concurrent": 2})
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="asha")
    table = pd.read_csv(result.path / "results.csv")
    assert len(table) == 6 and set(table["status"]) == {"TERMINATED"}
    for column in ("trial_id", "stage1.weight_decay", "stage1.lr", "final_val_acc", "final_test_acc",
                   "best_val_acc", "best_test_acc_few", "final_val_acc_head", "epochs", "stop_reason", "checkpoint"):
        assert column in table.columns, column
    assert (table["epochs"] < 5).sum() >= 1, table[["epochs", "stop_reason"]]
    assert table.loc[table["epochs"] < 5, "stop_reason"].str.contains("ASHA").all()
    assert (table["epochs"] == 5).any()
    # every trial, stopped early or not, kept its validation predictions: the ties are paired
    assert set(table["tie_test"]) == {"mcnemar"} and table["mcnemar_p"].between(0, 1).all()
    history = pd.read_csv(result.path / "history.csv")
    assert len(history) == table["epochs"].sum()
    # Trial processes are reused: 6 trials, 2 at a time, need fewer than 6 processes.
    assert history.groupby("trial_id")["pid"].first().nunique() < len(table)
    best = yaml.safe_load((result.path / "best_config.yaml").read_text())
    # The documented tie rule (several trials may reach 100 % on 50 images): more epochs, then trial id.
    winner = table.sort_values(["final_val_acc", "epochs", "trial_id"], ascending=[False, False, True]).iloc[0]
    assert best["stage1"]["weight_decay"] == pytest.approx(winner["stage1.weight_decay"])
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary["best"]["trial_id"] == winner["trial_id"]
    # Lazy test evaluation: test only where ASHA can stop a trial (its rungs: 1, 2, 4) and at stage ends (4, 5);
    # the winner's best-by-validation epoch has its test figures all the same
    assert (history["has_test"].astype(bool) == (history["epoch"] != 3)).all()
    assert not pd.isna(winner["best_test_acc"]) and not pd.isna(winner["final_test_acc"])
    assert (result.path / "optuna.db").exists() and (result.path / "space.yaml").exists()
    # Optuna records what ASHA stopped as PRUNED, with its per-epoch values; finished trials as COMPLETE.
    import optuna

    trials = optuna.load_study(study_name="search", storage=f"sqlite:///{result.path / 'optuna.db'}").trials
    states = sorted(t.state.name for t in trials)
    assert states == sorted(["PRUNED"] * int((table["epochs"] < 5).sum()) + ["COMPLETE"] * int((table["epochs"] == 5).sum()))
    for t in trials:  # intermediate values at the global epoch (Tune passes the last result only as final)
        epochs = sorted(t.intermediate_values)
        assert epochs and epochs == list(range(1, len(epochs) + 1)), epochs
        if t.state.name == "PRUNED":  # Optuna keeps the last intermediate value as a pruned trial's value
            assert len(epochs) < 5 and t.value == t.intermediate_values[epochs[-1]]
        else:
            assert t.value is not None and len(epochs) >= 4


def test_two_worker_trial_trains_with_ddp(local_ray, cifar10_root, tmp_path):
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=2, stage2_epochs=1, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"num_samples": 1, "resources": {"num_workers": 2, "cpus_per_worker": 1}})
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="ddp")
    table = pd.read_csv(result.path / "results.csv")
    assert table.loc[0, "stop_reason"] == "completed" and table.loc[0, "epochs"] == 3
    history = pd.read_csv(result.path / "history.csv")
    assert (history["world_size"] == 2).all()
    assert Path(table.loc[0, "checkpoint"], "state.pt").exists()
    # the validation predictions of both ranks' shards, in the validation set's order: those of the saved
    # model evaluated in one process
    import numpy as np
    import torch

    from ltsearch.build import load_data, model_from_config, split_loader
    from ltsearch.config import ExperimentConfig
    from ltsearch.selection import unpack_correct

    state = torch.load(Path(table.loc[0, "checkpoint"], "state.pt"), weights_only=False)
    config = ExperimentConfig.model_validate(state["config"])
    data = load_data(config)
    model = model_from_config(config.model, data.num_classes)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        pred = torch.cat([model.eval()(x).argmax(1) for x, _ in split_loader(config, data, "val", 64, train=False)])
    correct = unpack_correct(np.load(Path(table.loc[0, "checkpoint"], "val_predictions.npy")), len(data.val_y))
    assert 100 * correct[0, 0].mean() == pytest.approx(table.loc[0, "final_val_acc"])
    assert (correct[0, 0] == (pred == data.val_y).numpy()).mean() >= 0.96  # bf16 training may flip a near-tie
    assert table.loc[0, "tie_test"] == "mcnemar"


def test_staged_multi_objective_search(local_ray, cifar10_root, tmp_path):
    """Stage 1 searched, stage 2 + tau searched on cached features of the top-2 stage-1 trials; two
    objectives, so Optuna records a Pareto front."""
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=2, stage2_epochs=2, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]},
        "stage2.weight_decay": {"loguniform": [1e-3, 1.0]},
        "stage2.maxnorm_thresh": {"uniform": [0.0, 1.0]},
        "posthoc.tau": {"uniform": [0.0, 2.0]},
    }, search={"mode": "staged", "num_samples": 3, "metric": ["tau_val_acc", "tau_val_acc_tail"],
               "direction": ["max", "max"], "staged": {"top_k": 2, "num_samples": 6, "views": 2}})
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="staged")
    table = pd.read_csv(result.path / "results.csv")
    stage1, stage2 = table[table["phase"] == "stage1"], table[table["phase"] == "stage2"]
    assert len(stage1) == 3 and len(stage2) == 6
    # parents: the top 2 by the first search metric at their best-by-validation epoch
    second = stage1["best_tau_val_acc"].nlargest(2).iloc[-1]  # ties at the cut: any of them may be chosen
    assert set(stage2["stage1_trial"]) <= set(stage1.loc[stage1["best_tau_val_acc"] >= second, "trial_id"])
    parents = stage1.set_index("trial_id")["stage1.weight_decay"]
    assert (stage2["stage1.weight_decay"].to_numpy() == parents[stage2["stage1_trial"]].to_numpy()).all()
    assert (stage2["epochs"] == 2).all() and stage2["final_tau_val_acc"].notna().all()
    assert (stage2["stop_reason"] == "completed").all()
    best = yaml.safe_load((result.path / "best_config.yaml").read_text())
    winner = stage2.loc[stage2["final_tau_val_acc"].idxmax()]
    assert best["stage2"]["weight_decay"] == pytest.approx(winner["stage2.weight_decay"])
    assert best["stage1"]["weight_decay"] == pytest.approx(winner["stage1.weight_decay"])
    pareto = pd.read_csv(result.path / "pareto.csv")
    assert set(pareto["study"]) == {"stage1", "stage2"} and {"tau_val_acc", "tau_val_acc_tail"} <= set(pareto.columns)
    # both phases' ties are paired: stage 1 from the files beside its checkpoints, stage 2 from its study
    assert set(table["tie_test"]) == {"mcnemar"} and "val_correct" not in table


def _feature_cache(num_classes=3, dim=64, n=60, seed=0) -> dict:
    """A cache as `cache_features` returns it, of random separable features (what stage 2 sees)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=g)

    def split(count):
        y = torch.arange(num_classes).repeat_interleave(count)
        return centres[y] + torch.randn(len(y), dim, generator=g), y

    head = {"classifier.weight": 0.01 * torch.randn(num_classes, dim, generator=g),
            "classifier.bias": torch.zeros(num_classes)}  # the stage-1 classifier stage 2 starts from
    return {"train_views": [split(n // num_classes)], "val": split(5), "test": split(10), "head": head,
            "class_counts": [n // num_classes] * num_classes, "num_classes": num_classes, "feature_dim": dim}


def _stage2_spec(tmp_path, cifar10_root, num_samples):
    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=1, stage2_epochs=2, space={
        "stage2.weight_decay": {"loguniform": [1e-3, 1.0]}},
        search={"mode": "staged", "staged": {"num_samples": num_samples}})
    return load_search_space(path)


def test_stage2_phase_resumes_keeping_finished_trials_and_redrawing_interrupted_ones(local_ray, cifar10_root,
                                                                                     tmp_path):
    import optuna

    from ltsearch.search.staged import search_stage2

    spec = _stage2_spec(tmp_path, cifar10_root, num_samples=3)
    caches, configs = {"p": local_ray.put(_feature_cache(num_classes=10))}, {"p": spec.base.model_dump()}
    keys, cluster = ["stage2.weight_decay"], {"CPU": 2.0}

    table, history = search_stage2(tmp_path, spec, keys, configs, caches, cluster, resume=False)
    assert len(table) == 3 and (table["status"] == "TERMINATED").all() and (table["epochs"] == 2).all()
    assert sorted(history["trial_id"].unique()) == sorted(table["trial_id"])
    study = optuna.load_study(study_name="stage2", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.ask()  # a trial an interrupted driver had started: it must be failed and redrawn, not kept

    more = _stage2_spec(tmp_path, cifar10_root, num_samples=5)
    table2, _ = search_stage2(tmp_path, more, keys, configs, caches, cluster, resume=True)
    assert len(table2) == 5 and set(table["trial_id"]) < set(table2["trial_id"])
    kept = table2.set_index("trial_id").loc[table["trial_id"], "final_val_acc"].to_numpy()
    assert kept.tolist() == table["final_val_acc"].tolist()
    states = [t.state for t in optuna.load_study(study_name="stage2",
                                                  storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and "stage2_00003" not in set(table2["trial_id"])
    per_class = study.trials[0].user_attrs["per_class"]
    assert len(per_class["test_per_class_acc"]) == 10
    # each trial's validation predictions (5 images x 10 classes, two classifiers) survive the resume
    from ltsearch.search.results import VAL_CORRECT

    assert [r["shape"] for r in table[VAL_CORRECT]] == [[2, 50]] * 3
    assert table2.set_index("trial_id").loc[table["trial_id"], VAL_CORRECT].tolist() == table[VAL_CORRECT].tolist()


def test_stage2_trial_that_raises_is_an_error_row_and_the_phase_finishes(local_ray, cifar10_root, tmp_path):
    from ltsearch.search.staged import search_stage2

    spec = _stage2_spec(tmp_path, cifar10_root, num_samples=2)
    caches = {"p": local_ray.put(_feature_cache(num_classes=10, dim=7))}  # ResNet-8's classifier takes 64
    table, history = search_stage2(tmp_path, spec, ["stage2.weight_decay"], {"p": spec.base.model_dump()}, caches,
                                   {"CPU": 2.0}, resume=False)
    assert len(table) == 2 and (table["status"] == "ERROR").all() and history.empty
    assert table["stop_reason"].str.contains("shapes|size", regex=True).all()


def test_stage2_when_conditions_see_the_stage1_parents_values(local_ray, cifar10_root, tmp_path):
    """Bug: staged mode checked `when:` of stage-2 keys against `base`, not the chosen parent's sampled values."""
    from ltsearch.config import with_overrides
    from ltsearch.search.staged import search_stage2

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=1, stage2_epochs=1, space={
        "stage1.lr": {"choice": [0.05, 0.2]},
        "stage2.weight_decay": {"loguniform": [1e-3, 1.0], "when": {"stage1.lr": 0.2}}},
        search={"mode": "staged", "staged": {"num_samples": 4}})
    spec = load_search_space(path)
    assert spec.base.stage1.lr == 0.05  # the condition never holds for base
    cache = _feature_cache(num_classes=10)
    parent = with_overrides(spec.base, {"stage1.lr": 0.2}).model_dump()
    table, _ = search_stage2(tmp_path, spec, ["stage2.weight_decay"], {"p": parent}, {"p": local_ray.put(cache)},
                             {"CPU": 2.0}, resume=False)
    assert len(table) == 4 and table["stage2.weight_decay"].notna().all()


def test_confirmation_retrains_the_top_trials_with_fresh_seeds_and_chooses_by_the_mean(local_ray, cifar10_root,
                                                                                       tmp_path, capsys):
    """Joint mode: 3 search trials, the top 2 re-trained with seeds 1 and 2 as a grid Tune phase; the choice,
    best_config.yaml and summary.json follow the best mean; --resume of the finished experiment keeps the
    confirmation runs (Tune restores the phase, nothing re-trains)."""
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=1, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-1]}},
        search={"num_samples": 3, "sampler": {"type": "random", "seed": 0}, "max_concurrent": 2,
                "confirm": {"top_k": 2, "seeds": [1, 2]}})
    spec = load_search_space(path)
    result = run_search(spec, storage=tmp_path / "runs", name="confirm")
    out = capsys.readouterr().out
    assert "Confirmation: re-training the top 2 configurations by val_acc" in out
    table = pd.read_csv(result.path / "results.csv", dtype={"trial_id": str, "confirmed_trial": str})
    search, confirm = table[table["phase"] == "search"], table[table["phase"] == "confirm"]
    assert len(search) == 3 and len(confirm) == 2
    for column in ("val_images", "objective_lo", "objective_hi", "final_val_acc_lo", "best_val_acc_hi",
                   "tied_with_best"):
        assert search[column].notna().all(), column
    assert (search["val_images"] == 50).all()  # 10 classes x 5 validation images
    assert (search["objective_lo"] <= search["objective"]).all()
    assert (search["objective"] <= search["objective_hi"]).all()
    ranked = search.sort_values(["objective", "epochs", "trial_id"], ascending=[False, False, True])
    top2 = ranked["trial_id"].head(2)
    assert set(confirm["confirmed_trial"]) == set(top2)

    runs = pd.read_csv(result.path / "confirm.csv", dtype={"trial_id": str, "confirmed_trial": str})
    assert len(runs) == 4 and sorted(runs["seed"]) == [1, 1, 2, 2] and (runs["stop_reason"] == "completed").all()
    assert runs["checkpoint"].str.contains("/confirm/").all()
    history = pd.read_csv(result.path / "history.csv", dtype={"trial_id": str})
    seeds = history[history["phase"] == "confirm"].groupby("trial_id")["epoch"].count()
    assert sorted(seeds.index) == sorted(runs["trial_id"])  # one epoch each, recorded
    means = runs.groupby("confirmed_trial")["final_val_acc"].mean()
    assert confirm.set_index("confirmed_trial")["mean_val_acc"].to_dict() == pytest.approx(means.to_dict())
    chosen = means.idxmax() if means.nunique() > 1 else confirm.iloc[0]["confirmed_trial"]
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary["best"]["trial_id"] == chosen == summary["confirm"]["confirmed_pick"]
    assert summary["confirm"]["search_pick"] == top2.iloc[0]  # equal values: ranked by trial id, as on resume
    assert json.loads((result.path / "confirm_plan.json").read_text()) == {"candidates": top2.tolist(),
                                                                          "seeds": [1, 2]}
    best = yaml.safe_load((result.path / "best_config.yaml").read_text())
    chosen_wd = search.set_index("trial_id").at[chosen, "stage1.weight_decay"]
    assert best["stage1"]["weight_decay"] == pytest.approx(chosen_wd) and best["trainer"]["seed"] == 0

    again = run_search(spec, storage=tmp_path / "runs", name="confirm", resume=True)
    rerun = pd.read_csv(again.path / "confirm.csv", dtype={"trial_id": str})
    assert sorted(rerun["trial_id"]) == sorted(runs["trial_id"])
    kept = rerun.set_index("trial_id")["final_val_acc"]
    assert kept.to_dict() == runs.set_index("trial_id")["final_val_acc"].to_dict()


def test_staged_confirmation_retrains_the_parent_and_refits_stage2(local_ray, cifar10_root, tmp_path):
    from ltsearch.search import run_search

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=1, stage2_epochs=1, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]},
        "stage2.weight_decay": {"loguniform": [1e-3, 1.0]},
    }, search={"mode": "staged", "num_samples": 2, "staged": {"top_k": 2, "num_samples": 4, "views": 1},
               "confirm": {"top_k": 2, "seeds": [5]}})
    result = run_search(load_search_space(path), storage=tmp_path / "runs", name="staged_confirm")
    table = pd.read_csv(result.path / "results.csv", dtype={"trial_id": str, "stage1_trial": str,
                                                             "confirmed_trial": str})
    stage2, confirm = table[table["phase"] == "stage2"], table[table["phase"] == "confirm"]
    top2 = stage2.sort_values(["objective", "epochs", "trial_id"], ascending=[False, False, True]).head(2)
    assert set(confirm["confirmed_trial"]) == set(top2["trial_id"])
    runs = pd.read_csv(result.path / "confirm.csv", dtype={"trial_id": str, "confirmed_trial": str,
                                                           "stage1_trial": str, "stage1_run": str})
    assert len(runs) == 2 and (runs["seed"] == 5).all() and (runs["stop_reason"] == "completed").all()
    # each confirmed stage-2 configuration is re-fitted on its own parent, re-trained with seed 5
    assert runs.set_index("confirmed_trial")["stage1_trial"].to_dict() == top2.set_index("trial_id")[
        "stage1_trial"].to_dict()
    assert runs["checkpoint"].str.contains("/confirm/").all()
    assert runs["stage1_run"].nunique() == top2["stage1_trial"].nunique()  # one re-training per parent and seed
    assert (runs["final_val_acc"] == runs["objective"]).all()
    best = yaml.safe_load((result.path / "best_config.yaml").read_text())
    chosen = json.loads((result.path / "summary.json").read_text())["best"]["trial_id"]
    assert chosen == confirm.sort_values("confirm_rank")["confirmed_trial"].iloc[0]
    chosen_wd = stage2.set_index("trial_id").at[chosen, "stage2.weight_decay"]
    assert best["stage2"]["weight_decay"] == pytest.approx(chosen_wd)


def test_staged_search_on_a_finished_stage1_run(local_ray, cifar10_root, tmp_path):
    """`search.staged.stage1_run`: no stage-1 phase; stage 2 is searched on the given run's best checkpoint."""
    from ltsearch.config import with_overrides
    from ltsearch.search import run_search
    from ltsearch.train import train

    def spec(**search):
        return load_search_space(write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=2, stage2_epochs=2,
                                             space={"stage2.weight_decay": {"loguniform": [1e-3, 1.0]},
                                                    "posthoc.tau": {"uniform": [0.0, 2.0]}},
                                             search={"mode": "staged", "metric": "tau_val_acc",
                                                     "staged": {"num_samples": 3, **search}}))

    summary = train(with_overrides(spec().base, {"stage2.enabled": False}), out_dir=tmp_path / "run")
    result = run_search(spec(stage1_run=str(tmp_path / "run")), storage=tmp_path / "runs", name="given")
    table = pd.read_csv(result.path / "results.csv")
    assert not (result.path / "stage1").exists()  # no stage-1 Tune phase ran
    stage1, stage2 = table[table["phase"] == "stage1"], table[table["phase"] == "stage2"]
    assert list(stage1["trial_id"]) == ["stage1_run"] and len(stage2) == 3
    assert (stage2["stage1_trial"] == "stage1_run").all() and (stage2["stop_reason"] == "completed").all()
    assert stage1["best_tau_val_acc"].iloc[0] == pytest.approx(summary["stage1"]["best"]["tau_val_acc"])
