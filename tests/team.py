"""A PostgreSQL cluster of a test's own on loopback that checks passwords (scram-sha-256): the
machine's server trusts every local connection, so a password test needs its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mlflow_server import free_port


def _bindir() -> Path:
    """The folder of initdb and pg_ctl; the test skips where PostgreSQL is not installed
    (and fails in CI, which installs it)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if (Path(out.stdout.strip()) / "initdb").is_file():
            return Path(out.stdout.strip())
    if os.environ.get("CI"):
        raise AssertionError("PostgreSQL's initdb is not installed")
    pytest.skip("PostgreSQL's initdb is not installed")


@dataclass(frozen=True)
class Cluster:
    host: str
    port: int
    superuser_password: str

    def url(self, user: str, database: str) -> str:
        """A SQLAlchemy URL without a password: libpq takes it from PGPASSWORD or a pgpass file."""
        return f"postgresql+psycopg2://{user}@{self.host}:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg2

        connection = psycopg2.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            password=self.superuser_password,
            dbname=database,
        )
        connection.autocommit = True
        try:
            connection.cursor().execute(statement)
        finally:
            connection.close()


@contextmanager
def scram_cluster(superuser_password: str) -> Iterator[Cluster]:
    """A fresh PostgreSQL cluster on a free loopback port, every connection checked with
    scram-sha-256; stopped and removed afterwards. As root, it runs as the postgres user."""
    bindir = _bindir()
    folder = Path(tempfile.mkdtemp(prefix="cnnops-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root; the server runs as the postgres account
        shutil.chown(folder, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, pwfile = folder / "data", folder / "pw"
    pwfile.write_text(superuser_password + "\n")
    if run_as:
        shutil.chown(pwfile, "postgres")
    port = free_port()
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "--auth=scram-sha-256",
            "--username=postgres",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    pwfile.unlink()
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder}"
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(folder / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield Cluster("127.0.0.1", port, superuser_password)
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)
