"""ltsearch/search/studies.py: where an experiment's Optuna studies live and what they are called."""
from __future__ import annotations

import optuna
import pytest

from ltsearch.config import ConfigError
from ltsearch.search.studies import Studies
from ltsearch.storage import Location


def test_a_local_experiment_keeps_its_sqlite_study_inside(tmp_path):
    studies = Studies(Location(tmp_path / "exp"), None)
    assert studies.url == f"sqlite:///{tmp_path / 'exp' / 'optuna.db'}"
    assert studies.name("stage1") == "stage1" and studies.phase_of("stage1") == "stage1"
    assert studies.start(resume=False) == f"Optuna studies: {studies.url}"


@pytest.mark.storage
def test_a_server_names_each_study_after_its_experiment(postgres_server, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    studies = Studies(Location(s3_server.uri("runs/exp")), postgres_server)
    assert studies.name("stage2") == "s3://ltsearch/runs/exp/stage2"
    assert studies.phase_of("s3://ltsearch/runs/exp/stage2") == "stage2"
    assert studies.phase_of("s3://ltsearch/runs/other/stage2") is None  # another experiment's study
    studies.check()
    optuna.create_study(study_name=studies.name("stage1"), storage=studies.storage())
    assert studies.name("stage1") in {s.study_name for s in optuna.get_all_study_summaries(postgres_server)}


@pytest.mark.storage
def test_a_database_that_does_not_answer_is_refused_in_one_line():
    from .servers import free_port

    url = f"postgresql://someone:secret@127.0.0.1:{free_port()}/optuna"
    with pytest.raises(ConfigError) as err:
        Studies(Location("runs/x"), url).check()
    message = str(err.value)
    assert message.startswith("search.optuna_storage: postgresql://someone:***@127.0.0.1:")
    assert "the database does not answer" in message and "secret" not in message and "\n" not in message


@pytest.mark.storage
def test_a_mirrored_sqlite_study_is_copied_to_object_storage_and_restored(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    exp = Location(s3_server.uri("studies/mirror"))
    studies = Studies(exp, None)
    assert "SQLite on this machine" in studies.start(resume=False) and studies.local is not None
    study = optuna.create_study(study_name="stage1", storage=studies.storage())
    study.tell(study.ask(), 0.5)
    studies.save()
    assert (exp / "optuna.db").is_file()

    studies.local.unlink()  # a fresh driver machine: no local copy
    again = Studies(exp, None)
    again.start(resume=True)
    restored = optuna.load_study(study_name="stage1", storage=again.storage())
    assert [t.value for t in restored.trials] == [0.5]
    again.start(resume=False)  # a new experiment of that name starts from an empty study
    assert optuna.get_all_study_summaries(again.storage()) == []
