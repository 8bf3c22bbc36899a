"""Searches whose experiment lives in object storage (a real S3-compatible server, moto, with IAM auth) and
whose Optuna studies live in a real PostgreSQL server, on Ray clusters started by the tests: a driver
killed with SIGKILL and resumed by a new driver in a fresh folder; `ray job submit`, `ray job stop` and a
resumed job; and the refusals of storage and database problems before any trial starts."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import two_node_cluster, write_space
from .servers import BUCKET, free_port

pytestmark = [pytest.mark.storage, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _csv(s3, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(s3.read(key)), dtype={"trial_id": str, "stage1_trial": str})


def _finished_trials(s3, folder: str) -> dict[str, int]:
    """Trial folder -> lines of its result.json in the store, for trials that reported their last epoch."""
    done = {}
    for key in s3.keys(folder):
        if key.endswith("/result.json"):
            lines = [json.loads(x) for x in s3.read(key.removeprefix(f"{BUCKET}/")).decode().splitlines() if x.strip()]
            if lines and lines[-1].get("epoch") == lines[-1].get("total_epochs"):
                done[key.split("/")[-2]] = len(lines)
    return done


def _recorded_finished(s3, folder: str) -> set[str]:
    """Trial ids Tune's newest saved experiment state in the store records as TERMINATED: what a hard kill of
    the driver cannot lose (a trial finishing in the seconds before the kill, after the last save, is run
    again under a new id on resume, as with a local folder)."""
    states = [k for k in s3.keys(folder) if k.rsplit("/", 1)[-1].startswith("experiment_state-")]
    if not states:
        return set()
    try:
        saved = json.loads(s3.read(max(states).removeprefix(f"{BUCKET}/")))
    except (ValueError, OSError):  # being replaced
        return set()
    trials = [json.loads(state) for state, _ in saved["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def _recorded_and_finished(s3, folder: str) -> tuple[set[str], dict[str, int]]:
    """(trial ids the saved state records as finished, their folders' result.json line counts)."""
    recorded = _recorded_finished(s3, folder)
    finished = {f: n for f, n in _finished_trials(s3, folder).items()
                if any(f.startswith(f"trial_{t}_") for t in recorded)}
    return recorded, finished


def _staged_space(path: Path, root: Path, optuna_storage: str | None, num_samples: int = 4) -> Path:
    return write_space(path, root, stage1_epochs=3, stage2_epochs=2, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]},
        "stage2.weight_decay": {"loguniform": [1e-4, 1e-2]}},
        search={"mode": "staged", "num_samples": num_samples, "max_concurrent": 1,  # one at a time: the kill
                # lands while trials are left (the bucket holds a finished trial's results seconds after it ends)
                "scheduler": {"enabled": False}, "staged": {"top_k": 2, "num_samples": 6},
                **({"optuna_storage": optuna_storage} if optuna_storage else {})})


def test_staged_search_on_s3_and_postgres_survives_sigkill_of_the_driver(cifar10_root, tmp_path, s3_server,
                                                                         postgres_server):
    import optuna

    prefix, name = "sigkill", "staged"
    with two_node_cluster(tmp_path, extra_env=s3_server.env) as (address, env, _):
        space = _staged_space(tmp_path / "s.yaml", cifar10_root, postgres_server)
        cmd = [sys.executable, str(REPO / "run_search.py"), str(space), "--address", address,
               "--storage", s3_server.uri(prefix), "--name", name]
        first, second = tmp_path / "first", tmp_path / "second"
        first.mkdir()
        second.mkdir()
        log = tmp_path / "first.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=first, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        recorded, before = set(), {}
        while not before and time.time() < deadline:  # result.json is uploaded after the state that records it
            assert proc.poll() is None, f"the first driver ended before it was killed: {log.read_text()[-3000:]}"
            time.sleep(0.5)
            recorded, before = _recorded_and_finished(s3_server, f"{prefix}/{name}/stage1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert 1 <= len(before) < 4  # killed mid-search, with finished trials in the store
        assert f"{BUCKET}/{prefix}/{name}/results.csv" not in s3_server.keys(prefix)

        resumed = subprocess.run([*cmd, "--resume"], cwd=second, env=env, capture_output=True, text=True,
                                 timeout=600, check=False)  # a new driver in a folder that never saw the run
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Optuna studies: postgresql://ltsearch@127.0.0.1" in resumed.stdout
    after = _finished_trials(s3_server, f"{prefix}/{name}/stage1")
    assert {k: after[k] for k in before} == before  # trials finished before the kill were not run again
    table = _csv(s3_server, f"{prefix}/{name}/results.csv")
    stage1, stage2 = table[table["phase"] == "stage1"], table[table["phase"] == "stage2"]
    assert len(stage1) == 4 and stage1["trial_id"].is_unique and (stage1["stop_reason"] == "completed").all()
    assert recorded <= set(stage1["trial_id"])  # and each is counted once, with its first run's results
    assert len(stage2) == 6 and stage2["objective"].notna().all()
    assert stage1["checkpoint"].str.startswith(f"s3://{BUCKET}/{prefix}/{name}/stage1/").all()
    history = _csv(s3_server, f"{prefix}/{name}/history.csv")
    assert not history.duplicated(["phase", "trial_id", "epoch"]).any()
    # the studies are in PostgreSQL, named after the experiment; every trial counted once, none left running
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(postgres_server)}
    exp_uri = f"s3://{BUCKET}/{prefix}/{name}"
    assert {f"{exp_uri}/stage1", f"{exp_uri}/stage2"} <= set(studies)
    stage1_study = optuna.load_study(study_name=f"{exp_uri}/stage1", storage=postgres_server)
    states = [t.state for t in stage1_study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    assert optuna.trial.TrialState.RUNNING not in states
    stage2_study = optuna.load_study(study_name=f"{exp_uri}/stage2", storage=postgres_server)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in stage2_study.trials) == 6
    summary = json.loads(s3_server.read(f"{prefix}/{name}/summary.json"))
    assert summary["experiment"] == exp_uri and "optuna_storage" in summary

    # the report reads the experiment from the store and writes report.html next to it
    report = subprocess.run([sys.executable, "-m", "ltsearch", "report", exp_uri, "--no-png"], cwd=second,
                            env={**os.environ, **s3_server.env}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    assert f"{BUCKET}/{prefix}/{name}/report.html" in s3_server.keys(prefix)
    assert b"Parameter importances" in s3_server.read(f"{prefix}/{name}/report.html")


def test_postgres_study_records_asha_and_completed_trials_as_sqlite_does(cifar10_root, tmp_path, postgres_server):
    """The states optuna-dashboard shows for a study in PostgreSQL: PRUNED for what ASHA stopped, COMPLETE for
    the finished trials, as test_search.py checks for SQLite (here with a local experiment folder)."""
    import optuna

    path = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=4, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-1]},
        "stage1.lr": {"choice": [0.05, 3.0]}},  # lr 3.0 learns nothing: ASHA has something to stop
        search={"num_samples": 6, "scheduler": {"grace_period": 1, "reduction_factor": 2},
                "sampler": {"type": "random", "seed": 0}, "max_concurrent": 2, "optuna_storage": postgres_server})
    proc = subprocess.run([sys.executable, str(REPO / "run_search.py"), str(path), "--storage", str(tmp_path / "runs"),
                           "--name", "pg"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "pg"
    table = pd.read_csv(exp / "results.csv")
    assert not (exp / "optuna.db").exists()  # the study is in the server, not beside the results
    study = optuna.load_study(study_name=f"{exp}/search", storage=postgres_server)
    states = sorted(t.state.name for t in study.trials)
    stopped = int((table["epochs"] < 4).sum())
    assert stopped >= 1 and table.loc[table["epochs"] < 4, "stop_reason"].str.contains("ASHA").all()
    assert states == sorted(["PRUNED"] * stopped + ["COMPLETE"] * (len(table) - stopped))


def _job(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=REPO)


def _job_status(job: str, env: dict) -> str:
    """The job's status word from `ray job status` ("Job 'x' was stopped", "... is currently RUNNING")."""
    out = _job(["status", job], env).stdout.lower()
    for status in ("succeeded", "failed", "stopped", "running", "pending"):
        if status in out:
            return status.upper()
    return out


def test_ray_job_submit_stop_and_resume_with_object_storage(cifar10_root, tmp_path, s3_server):
    """`ray job submit --working-dir . -- python run_search.py ...` as the README says; `ray job stop` mid-search
    (Ray sends SIGTERM, then SIGKILL); a second job with `--resume` completes the experiment in the store."""
    prefix, name = "jobs", "job"
    with two_node_cluster(tmp_path, extra_env=s3_server.env) as (_, env, _):
        space = write_space(tmp_path / "s.yaml", cifar10_root, stage1_epochs=3, space={
            "stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
            search={"num_samples": 4, "max_concurrent": 1, "scheduler": {"enabled": False}})
        entry = ["--", "python", "run_search.py", str(space), "--storage", s3_server.uri(prefix), "--name", name]
        deadline = time.time() + 120
        while True:  # a fresh cluster's job agent answers a few seconds after `ray start`
            submitted = _job(["submit", "--no-wait", "--working-dir", ".", "--submission-id", "first", *entry], env)
            if "No available agent" not in submitted.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        deadline = time.time() + 400
        recorded, before = set(), {}
        while not before and time.time() < deadline:
            assert _job_status("first", env) in ("PENDING", "RUNNING"), _job(["logs", "first"], env).stdout[-3000:]
            time.sleep(1)
            recorded, before = _recorded_and_finished(s3_server, f"{prefix}/{name}/search")
        stopped = _job(["stop", "first"], env)
        assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        assert _job_status("first", env) == "STOPPED"
        assert 1 <= len(before) < 4

        resumed = _job(["submit", "--working-dir", ".", "--submission-id", "second", *entry, "--resume"], env,
                       timeout=600)  # waits, following the job's logs
        assert resumed.returncode == 0 and _job_status("second", env) == "SUCCEEDED", resumed.stdout[-3000:]
        assert "trials in s3://" in resumed.stdout  # the job's own output, followed by the CLI
    after = _finished_trials(s3_server, f"{prefix}/{name}/search")
    assert {k: after[k] for k in before} == before  # trials finished before the stop were not run again
    table = _csv(s3_server, f"{prefix}/{name}/results.csv")
    assert len(table) == 4 and table["trial_id"].is_unique and (table["stop_reason"] == "completed").all(), \
        table[["trial_id", "status", "stop_reason", "epochs"]].to_string() + str(recorded) + str(before) + str(after)
    assert recorded <= set(table["trial_id"])
    keys = s3_server.keys(f"{prefix}/{name}")
    for file in ("space.yaml", "results.csv", "history.csv", "best_config.yaml", "summary.json", "optuna.db"):
        assert f"{BUCKET}/{prefix}/{name}/{file}" in keys



@pytest.mark.parametrize("case", ["no bucket", "no credentials", "read-only", "no store", "no database"])
def test_storage_and_database_problems_are_refused_before_any_trial(cifar10_root, tmp_path, s3_server, case):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.read_only_env if case == "read-only" else s3_server.env)
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    uri = s3_server.uri("refused")
    database = None
    if case == "no bucket":
        uri = "s3://no-such-bucket/refused"
    elif case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    elif case == "no store":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "no database":
        database = f"postgresql://ltsearch@127.0.0.1:{free_port()}/optuna"
    space = _staged_space(tmp_path / "s.yaml", cifar10_root, database)
    proc = subprocess.run([sys.executable, str(REPO / "run_search.py"), str(space), "--storage", uri,
                           "--name", "x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"no bucket": "--storage: s3://no-such-bucket/refused/x: bucket 'no-such-bucket' does not exist",
                "no credentials": "--storage: s3://ltsearch/refused/x: no credentials found",
                "read-only": "--storage: s3://ltsearch/refused/x: cannot write there: access denied",
                "no store": "--storage: s3://ltsearch/refused/x: the store does not answer",
                "no database": "search.optuna_storage: postgresql://ltsearch@127.0.0.1"}
    assert expected[case] in lines[0]
    assert "Ray dashboard" not in proc.stdout  # refused before Ray started
    assert s3_server.keys("refused") == []  # nothing half-written
