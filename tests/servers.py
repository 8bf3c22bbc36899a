"""Real servers of the tests' own, for the `storage` tests: an S3-compatible object store (moto's server
mode, the one Ray's own storage tests use, in its own process, with authentication enforced) and a
PostgreSQL server (initdb + pg_ctl into a temp folder). Each listens on a free loopback port and is
stopped by its fixture. A server that cannot start fails the test with one line saying why."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "ltsearch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited at start (code {proc.returncode}): {log.read_text()[-500:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{what} did not answer at {url} within {timeout:.0f} s: {log.read_text()[-500:]}")


@dataclass
class S3:
    endpoint: str
    env: dict  # endpoint, the writer's credentials, region: what a process needs to use the store
    read_only_env: dict  # the same with a user that may only read

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.env["AWS_ACCESS_KEY_ID"],
                                       secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under `prefix` of the bucket."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
        return sorted(i.path for i in self.filesystem().get_file_info(selector) if i.type == pyarrow.fs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server with IAM authentication on: a writer (s3:*) and a reader (s3:Get*/List*/Head*) user, and an
    empty bucket `ltsearch`. Unsigned requests and unknown keys are refused, as by a real store."""
    import boto3

    binary = Path(sys.executable).with_name("moto_server")
    if not binary.is_file():
        pytest.fail(f"S3 server: {binary} not found (pip install 'moto[server]', part of the dev extra)")
    port, log = free_port(), tmp_path_factory.mktemp("s3") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for(f"{endpoint}/moto-api/", proc, "S3 server (moto)", log)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        keys = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:Get*", "s3:List*", "s3:Head*"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}))

        def env_of(key: dict) -> dict:
            return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

        yield S3(endpoint, env_of(keys["writer"]), env_of(keys["reader"]))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _postgres_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        pytest.fail("PostgreSQL server: initdb not found (apt-get install -y postgresql; .ci/run does it)")
    return Path(os.path.realpath(found)).parent


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server in a temp folder on a free loopback port, database `optuna`, trust auth for the
    tests' own user `ltsearch`. Run as the `postgres` user when the tests run as root (PostgreSQL refuses
    root). Yields the server's SQLAlchemy URL."""
    binaries = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="ltsearch-pg-"))  # not under pytest's root-only tmp dir
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = folder / "data", folder / "server.log", free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            pytest.fail(f"PostgreSQL server: {Path(cmd[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "ltsearch", "--auth=trust", "-E", "UTF8")
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -k {folder}")
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ltsearch", "optuna")
        yield f"postgresql://ltsearch@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)
