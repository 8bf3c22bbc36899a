"""The confirmation phase's settings and its choice, without a cluster: `search.confirm` validation, the
candidates it re-trains, and the result files written from hand-made search and confirmation tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ltsearch.config import ConfigError
from ltsearch.space import load_search_space

from .conftest import write_space

SPACE = {"stage1.weight_decay": {"loguniform": [1e-4, 1e-1]}}


def _spec(tmp_path, root, **search):
    return load_search_space(write_space(tmp_path / "s.yaml", root, space=SPACE, search=search))


def test_confirm_is_off_by_default_and_validated(tmp_path, cifar10_root):
    assert _spec(tmp_path, cifar10_root).search.confirm is None
    confirm = _spec(tmp_path, cifar10_root, confirm={"top_k": 2, "seeds": [1, 2]}).search.confirm
    assert confirm.top_k == 2 and confirm.seeds == [1, 2]
    for bad, message in [({"top_k": 2, "seeds": []}, "search.confirm.seeds"),
                         ({"top_k": 0, "seeds": [1]}, "search.confirm.top_k"),
                         ({"seeds": [1, 1]}, "seeds must be distinct"),
                         ({"seeds": [0, 1]}, "0 is the search's own trainer.seed"),
                         ({"top_k": 2}, "search.confirm.seeds: Field required"),
                         ({"seeds": [1], "rounds": 2}, "search.confirm.rounds: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            _spec(tmp_path, cifar10_root, confirm=bad)


def test_confirm_refuses_a_searched_trainer_seed(tmp_path, cifar10_root):
    path = write_space(tmp_path / "s.yaml", cifar10_root, space={**SPACE, "trainer.seed": {"int": [0, 9]}},
                       search={"confirm": {"seeds": [11, 12]}})
    with pytest.raises(ConfigError, match="trainer.seed cannot also be searched"):
        load_search_space(path)


def _search_table() -> pd.DataFrame:
    """Three search trials; `lucky` has the highest single-run validation accuracy."""
    rows = [("lucky", 1e-2, 60.0), ("steady", 1e-3, 58.0), ("third", 1e-4, 40.0), ("failed", 5e-2, math.nan)]
    return pd.DataFrame([{"trial_id": t, "stage1.weight_decay": wd, "objective": v, "final_val_acc": v,
                          "final_test_acc": v - 5, "epochs": 4,
                          "status": "ERROR" if math.isnan(v) else "TERMINATED",
                          "stop_reason": "completed", "objective_lo": v - 6, "objective_hi": v + 6}
                         for t, wd, v in rows])


def _confirm_runs(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": f"run_{t}_{s}", "confirmed_trial": t, "seed": s, "objective": v,
                          "final_val_acc": v, "final_test_acc": v - 4, "epochs": 4, "status": "TERMINATED",
                          "stop_reason": "completed"}
                         for t, vs in values.items() for s, v in zip((1, 2), vs)])


def test_candidates_are_the_top_k_by_the_final_objective(tmp_path, cifar10_root):
    from ltsearch.search.confirm import confirm_candidates

    spec = _spec(tmp_path, cifar10_root, confirm={"top_k": 2, "seeds": [1, 2]})
    assert confirm_candidates(_search_table(), spec)["trial_id"].tolist() == ["lucky", "steady"]
    staged = _search_table().assign(phase=["stage2", "stage1", "stage2", "stage2"])
    assert confirm_candidates(staged, spec)["trial_id"].tolist() == ["lucky", "third"]


def test_result_files_follow_the_confirmed_pick_not_the_lucky_winner(tmp_path, cifar10_root, capsys):
    from ltsearch.search.experiment import _write_results

    spec = _spec(tmp_path, cifar10_root, confirm={"top_k": 2, "seeds": [1, 2]})
    exp = tmp_path / "exp"
    exp.mkdir()
    runs = _confirm_runs({"lucky": [50.0, 52.0], "steady": [57.0, 59.0]})
    history = pd.DataFrame({"trial_id": ["lucky", "steady"], "epoch": [1, 1], "val_acc": [60.0, 58.0]})
    runs_history = pd.DataFrame({"phase": "confirm", "trial_id": ["run_lucky_1"], "epoch": [1], "val_acc": [50.0]})
    table, best = _write_results(exp, spec, _search_table(), history, 12.0, runs=runs, runs_history=runs_history,
                                 validation={"images": {"overall": 50}, "per_class": 5})
    out = capsys.readouterr().out
    assert "Confirmation changed the choice: steady (best mean), not the search's pick lucky" in out
    assert "steady: 58.00 ± 1.41 (2/2 runs; search run 58.00)" in out
    assert best["trial_id"] == "steady" and best["confirmed"]["mean_objective"] == 58.0
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["stage1"]["weight_decay"] == pytest.approx(1e-3)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["best"]["trial_id"] == "steady" and summary["validation"]["images"] == {"overall": 50}
    assert summary["confirm"]["search_pick"] == "lucky" and summary["confirm"]["confirmed_pick"] == "steady"
    assert [c["confirmed_trial"] for c in summary["confirm"]["configurations"]] == ["steady", "lucky"]

    results = pd.read_csv(exp / "results.csv")
    assert results["phase"].tolist() == ["search"] * 4 + ["confirm"] * 2
    confirm = results[results["phase"] == "confirm"].set_index("confirmed_trial")
    assert confirm.loc["steady", "trial_id"] == "confirm_steady" and confirm.loc["steady", "confirm_rank"] == 1
    assert confirm.loc["steady", "mean_val_acc"] == 58.0 and confirm.loc["steady", "std_val_acc"] == pytest.approx(
        math.sqrt(2))
    assert confirm.loc["lucky", "mean_test_acc"] == 47.0 and confirm.loc["lucky", "search_objective"] == 60.0
    assert confirm.loc["lucky", "stage1.weight_decay"] == pytest.approx(1e-2)
    assert len(pd.read_csv(exp / "confirm.csv")) == 4
    assert pd.read_csv(exp / "history.csv")["phase"].tolist() == ["search", "search", "confirm"]
    assert len(table) == 6


def test_when_every_confirmation_run_failed_the_search_pick_stays(tmp_path, cifar10_root, capsys):
    from ltsearch.search.experiment import _write_results

    spec = _spec(tmp_path, cifar10_root, confirm={"top_k": 1, "seeds": [1, 2]})
    runs = _confirm_runs({"lucky": [math.nan, math.nan]}).assign(status="ERROR")
    (tmp_path / "exp").mkdir()
    _, best = _write_results(tmp_path / "exp", spec, _search_table(), pd.DataFrame(), 1.0, runs=runs)
    assert best["trial_id"] == "lucky" and "every run failed" in capsys.readouterr().out
    results = pd.read_csv(tmp_path / "exp" / "results.csv")
    assert results.loc[results["phase"] == "confirm", "status"].tolist() == ["ERROR"]


@pytest.mark.e2e
def test_interrupted_confirmation_is_continued_by_resume(cifar10_root, tmp_path):
    """SIGKILL of run_search.py after the first confirmation run finished; --resume keeps it (Tune restores
    the confirm phase), continues the others from their checkpoints, and re-trains the same configuration."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .test_faults import _epochs, _kill_session_of, _wait

    space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=6, space=SPACE, search={
        "num_samples": 1, "max_concurrent": 1, "scheduler": {"enabled": False},
        "confirm": {"top_k": 1, "seeds": [1, 2, 3]}})
    exp = tmp_path / "runs" / "c"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "run_search.py"), str(space),
           "--storage", str(tmp_path / "runs"), "--name", "c"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait(lambda: any(_epochs(d)[-1:] == [6] for d in (exp / "confirm").glob("grid_trial_*")), proc, timeout=400)
    time.sleep(3)  # Tune saves its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_session_of(proc.pid)
    finished = {d.name: _epochs(d) for d in (exp / "confirm").glob("grid_trial_*") if _epochs(d)[-1:] == [6]}
    plan = json.loads((exp / "confirm_plan.json").read_text())
    assert not (exp / "confirm.csv").exists() and 1 <= len(finished) < 3  # interrupted mid-confirmation

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, check=False, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = {d.name: _epochs(d) for d in (exp / "confirm").glob("grid_trial_*") if _epochs(d)}
    assert len(trials) == 3 and all(epochs == list(range(1, 7)) for epochs in trials.values()), trials
    assert {name: trials[name] for name in finished} == finished  # kept, not re-trained
    assert json.loads((exp / "confirm_plan.json").read_text()) == plan
    runs = pd.read_csv(exp / "confirm.csv", dtype={"confirmed_trial": str})
    assert sorted(runs["seed"]) == [1, 2, 3] and set(runs["confirmed_trial"]) == set(plan["candidates"])
    assert (runs["stop_reason"] == "completed").all()
    results = pd.read_csv(exp / "results.csv")
    assert results.loc[results["phase"] == "confirm", "runs_ok"].tolist() == [3]
