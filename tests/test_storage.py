"""ltsearch/storage.py: one Location API over a local folder and an S3-compatible store (moto's server,
a real process with authentication on, for the `storage` tests)."""
from __future__ import annotations

import pytest

from ltsearch.storage import Location, StorageError, is_uri


def test_is_uri_tells_remote_from_local():
    assert is_uri("s3://bucket/prefix") and is_uri("gs://b/p") and is_uri("abfs://c@a.dfs.core.windows.net/p")
    assert not is_uri("runs") and not is_uri("/shared/runs") and not is_uri("file:///tmp/x")


def test_local_location_reads_writes_lists_and_copies(tmp_path):
    root = Location(tmp_path / "exp")
    assert root.is_local and not root.exists() and root.children() == []
    root.mkdir()
    (root / "a.txt").write_text("one")
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert root.children() == ["a.txt", "sub"] and (root / "a.txt").read_text() == "one"
    assert (root / "a.txt").is_file() and not (root / "sub").is_file() and (root / "a.txt").size() == 3
    assert not list(tmp_path.glob("exp/*.tmp"))  # the atomic write left no temporary file
    copy = root.download(tmp_path / "copy")
    assert (copy / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    (root / "sub").delete()
    assert root.children() == ["a.txt"]
    assert str(Location("file://" + str(tmp_path))) == str(tmp_path)


def test_local_check_creatable_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a folder"):
        Location(tmp_path / "file" / "exp").check_creatable()
    Location(tmp_path / "new" / "exp").check_creatable()
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_unknown_scheme_is_refused_in_one_line():
    with pytest.raises(StorageError) as err:
        Location("nosuchfs://bucket/prefix")
    assert "nosuchfs://bucket/prefix" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.mark.storage
def test_s3_location_round_trip(s3_env, tmp_path):
    exp = Location(s3_env.uri("unit/round-trip"))
    assert exp.uri == "s3://ltsearch/unit/round-trip" and exp.name == "round-trip" and not exp.is_local
    assert not exp.exists() and exp.children() == []
    (exp / "results.csv").write_text("a,b\n1,2\n")
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "state.pt").write_bytes(b"weights")
    (exp / "checkpoint").upload(source)
    assert exp.exists() and exp.children() == ["checkpoint", "results.csv"]
    assert (exp / "results.csv").read_text() == "a,b\n1,2\n" and (exp / "results.csv").is_file()
    assert s3_env.keys("unit/round-trip") == ["ltsearch/unit/round-trip/checkpoint/state.pt",
                                              "ltsearch/unit/round-trip/results.csv"]
    local = (exp / "checkpoint").download(tmp_path / "down")
    assert (local / "state.pt").read_bytes() == b"weights"
    exp.delete()
    assert s3_env.keys("unit/round-trip") == []


@pytest.mark.storage
def test_s3_check_creatable_accepts_the_bucket_and_leaves_nothing(s3_env):
    Location(s3_env.uri("unit/check")).check_creatable()
    assert s3_env.keys("unit/check") == []


@pytest.mark.storage
@pytest.mark.parametrize("case", ["no bucket", "no credentials", "wrong secret", "read-only", "no store"])
def test_s3_check_creatable_refuses_in_one_line(s3_server, monkeypatch, case):
    env = dict(s3_server.read_only_env if case == "read-only" else s3_server.env)
    uri = s3_server.uri("unit/refused")
    if case == "no bucket":
        uri = "s3://no-such-bucket/unit"
    elif case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "no store":
        from .servers import free_port

        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError) as err:
        Location(uri).check_creatable()
    message = str(err.value)
    assert uri in message and "\n" not in message
    expected = {"no bucket": "bucket 'no-such-bucket' does not exist", "no credentials": "no credentials found",
                "wrong secret": "access denied", "read-only": "cannot write there: access denied",
                "no store": "does not answer"}
    assert expected[case] in message, message
    assert s3_server.keys("unit/refused") == []
