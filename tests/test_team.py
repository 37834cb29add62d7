"""Team mode with real processes on loopback: a PostgreSQL cluster that checks passwords, an
`mlflow server` with basic auth on it (`cnnops server`), Optuna on the same cluster with a
password, a writer who runs the pipeline, a reader who may only read, and no secret written
anywhere."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT
from tests.mlflow_server import free_port, running
from tests.team import Cluster, scram_cluster

pytestmark = pytest.mark.slow

SECRETS = {
    "superuser": "pg-super-7Hq2xV",
    "mlflow_db": "ml-db-pw-3Rk9wZ",
    "optuna_db": "optuna-db-pw-5Tb1yQ",
    "admin": "admin-pw-8Ld4cN-long",
    "writer": "writer-pw-2Ys6uM-long",
    "reader": "reader-pw-9Pf3eK-long",
}
MODEL = "cnnops-team"


@dataclass(frozen=True)
class Team:
    url: str
    cluster: Cluster
    artifacts: Path

    def env(self, user: str, **extra: str) -> dict[str, str]:
        """What a member's shell holds: the server, their MLflow account, the Optuna password."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        return {
            **env,
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": SECRETS[user],
            "PGPASSWORD": SECRETS["optuna_db"],
            **extra,
        }

    @property
    def storage(self) -> str:
        return f"postgresql://optuna@{self.cluster.host}:{self.cluster.port}/optuna"


def as_user(url: str, user: str):  # noqa: ANN201 - an MlflowClient acting as `user`
    """An MLflow client with `user`'s credentials (MLflow reads them from the environment)."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        user,
        SECRETS[user],
    )
    return MlflowClient(url, url)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    folder = tmp_path_factory.mktemp("team")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    with scram_cluster(SECRETS["superuser"]) as cluster:
        for role, database in (("mlflow", "mlflow"), ("optuna", "optuna")):
            password = SECRETS[f"{role}_db"]
            cluster.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            cluster.sql(f"CREATE DATABASE {database} OWNER {role}")
        cluster.sql("CREATE DATABASE mlflow_auth OWNER mlflow")
        port = free_port()
        command = [
            str(BIN / "cnnops"),
            "server",
            "--backend-store-uri",
            f"postgresql://mlflow@{cluster.host}:{cluster.port}/mlflow",
            "--auth-database-uri",
            f"postgresql://mlflow@{cluster.host}:{cluster.port}/mlflow_auth",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--port",
            str(port),
        ]
        env = {
            **os.environ,
            "PGPASSWORD": SECRETS["mlflow_db"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": SECRETS["admin"],
        }
        url = f"http://127.0.0.1:{port}"
        with running(command, f"{url}/health", folder / "server.log", env=env):
            from mlflow.server.auth.client import AuthServiceClient

            as_user(url, "admin")
            admin = AuthServiceClient(url)
            for user in ("writer", "reader"):
                admin.create_user(user, SECRETS[user])
            try:
                yield Team(url, cluster, folder / "artifacts")
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


def cnnops_as(
    team: Team, user: str, *args: str, cwd: Path, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cnnops"), *args],
        cwd=cwd,
        env=team.env(user, **env),
        capture_output=True,
        text=True,
    )


def one_line_exit_2(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cnnops {command}: error: "), result.stderr
    return lines[0]


def test_a_writer_runs_the_pipeline_a_reader_cannot_promote_and_no_secret_is_written(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody gets in without an account.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert refused.value.code == 401

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    sets = [
        "--set", "train.max_epochs=2",
        "--set", "train.accelerator=cpu",
        "--set", f"registry.model_name={MODEL}",
        "--set", "mlflow.experiment=team",
        "--set", f"tune.storage={team.storage}",
        "--set", "tune.n_trials=3",
    ]  # fmt: skip
    outputs: list[str] = []

    def run(user: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        command, *rest = args
        result = cnnops_as(team, user, command, *sets, *rest, cwd=project, **env)
        outputs.append(result.stdout + result.stderr)
        return result

    # Wrong credentials, a wrong database password, a password in params: one line each.
    line = one_line_exit_2(
        run("writer", "train", MLFLOW_TRACKING_PASSWORD="wrong-password"), "train"
    )
    assert "refused the credentials (401, MLFLOW_TRACKING_USERNAME=writer)" in line
    for stage in ("fetch", "prepare"):
        assert run("writer", stage).returncode == 0, outputs[-1]
    line = one_line_exit_2(run("writer", "tune", PGPASSWORD="wrong-password"), "tune")
    assert "password authentication failed" in line and "tune.storage" in line
    leaky = f"tune.storage=postgresql://optuna:{SECRETS['optuna_db']}@127.0.0.1:1/optuna"
    line = one_line_exit_2(run("writer", "show-config", "--set", leaky), "show-config")
    assert "holds a password" in line and "optuna:***@" in line

    # The writer: train → tune with 2 workers on the password-protected storage → register.
    for stage in (["train"], ["tune", "--workers", "2"], ["register"], ["evaluate"]):
        result = run("writer", *stage)
        assert result.returncode == 0, result.stdout + result.stderr

    reader = as_user(team.url, "reader")
    assert reader.get_registered_model(MODEL).aliases == {"challenger": "1"}  # reading is fine
    line = one_line_exit_2(run("reader", "promote"), "promote")
    assert "denied MLFLOW_TRACKING_USERNAME=reader (403 on " in line
    assert reader.get_registered_model(MODEL).aliases == {"challenger": "1"}
    line = one_line_exit_2(run("reader", "register"), "register")
    assert "403" in line
    assert len(reader.search_model_versions(f"name='{MODEL}'")) == 1
    import mlflow
    import numpy as np

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")  # as the reader
    x = np.load(project / "data/prepared/test_x.npy")[:4]
    assert model.predict(x).shape == (4, 10)

    result = run("writer", "promote")
    assert result.returncode == 0, result.stdout + result.stderr
    writer = as_user(team.url, "writer")
    assert writer.get_registered_model(MODEL).aliases == {"challenger": "1", "champion": "1"}
    line = one_line_exit_2(run("reader", "rollback"), "rollback")
    assert writer.get_registered_model(MODEL).aliases == {"challenger": "1", "champion": "1"}

    # Every trial is a child run of the study's run.
    experiment = writer.get_experiment_by_name("team")
    runs = writer.search_runs([experiment.experiment_id])
    parents = [
        r
        for r in runs
        if r.data.tags.get("cnnops.stage") == "tune" and "optuna.trial" not in r.data.tags
    ]
    trials = [r for r in runs if "optuna.trial" in r.data.tags]
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}

    # No password anywhere: the files the pipeline wrote, MLflow's records, the output.
    secrets = [s.encode() for s in SECRETS.values()]
    written = [p for p in project.rglob("*") if p.is_file()]
    written += [p for p in team.artifacts.rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        content = path.read_bytes()
        assert not any(s in content for s in secrets), path
    for r in runs:
        records = str([r.data.params, r.data.tags, r.data.metrics, r.info.run_name])
        assert not any(s.decode() in records for s in secrets), r.info.run_id
    for output in outputs:
        assert not any(s.decode() in output for s in secrets), output


def test_an_account_is_checked_before_a_stage_starts(team: Team, tmp_path: Path) -> None:
    token = base64.b64encode(f"reader:{SECRETS['reader']}".encode()).decode()
    request = urllib.request.Request(f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1")
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {"MLFLOW_TRACKING_USERNAME": "nobody", "MLFLOW_TRACKING_PASSWORD": "nothing-at-all"}
    result = cnnops_as(team, "reader", "train", cwd=tmp_path, **env)
    line = one_line_exit_2(result, "train")
    assert "MLFLOW_TRACKING_USERNAME=nobody" in line and "nothing-at-all" not in line
    assert not (tmp_path / "models").exists()  # it stopped before training anything
