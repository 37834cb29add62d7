"""`cnnops retrain`: pull, reproduce, gate and report in one command, with exit statuses a
workflow can branch on. End to end in a temporary git + DVC repository with a local DVC remote
and the embedded MLflow store; the registry is read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cnnops.retrain import write_overrides
from tests.conftest import BIN, ROOT, git_dvc_project, sh

STAGES = ["fetch", "prepare", "train", "tune", "register", "evaluate", "promote"]
MARKER = "<!-- cnnops-retrain-report -->"
MODEL = "cnnops-digits"


def retrain(
    repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNNOPS_")}
    environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded store named in params.yaml
    return subprocess.run(
        [str(BIN / "cnnops"), "retrain", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
    )


def init_repo(path: Path, tiny: list[str]) -> Path:
    """A new git + DVC repository holding the project's pipeline files and code."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if tiny:  # the round trip `retrain --set` uses: params.yaml keeps its comments
        write_overrides(path / "params.yaml", tiny)
    return git_dvc_project(path)


def commit(repo: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", message, cwd=repo)


def registry(repo: Path) -> tuple[int, int | None]:
    """How many versions the model has, and which one is champion, read from the store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{MODEL}'")
    try:
        champion: int | None = int(client.get_model_version_by_alias(MODEL, "champion").version)
    except MlflowException:
        champion = None
    return len(versions), champion


def reports(repo: Path) -> tuple[str, dict[str, Any]]:
    md = (repo / "reports" / "retrain.md").read_text()
    data = json.loads((repo / "reports" / "retrain.json").read_text())
    assert md.splitlines()[0] == MARKER
    return md, data


def params_changed(data: dict[str, Any]) -> dict[str, Any]:
    return data["params_diff"].get("params.yaml", {})


@pytest.mark.slow
def test_retrain_trains_then_does_nothing_then_gates_a_worse_and_a_better_model(
    tmp_path: Path,
) -> None:
    # One epoch, one trial: a weak but real champion, quickly.
    repo = init_repo(tmp_path / "repo", ["train.max_epochs=1", "tune.n_trials=1"])
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=repo)
    commit(repo, "project")

    # (1) The first retraining trains everything, registers and promotes version 1. The remote
    # is new and empty: the pull of its missing outputs does not stop the run.
    first = retrain(repo)
    assert first.returncode == 0, first.stderr[-4000:]
    md, data = reports(repo)
    assert data["stages_ran"] == STAGES and data["registered"]
    assert data["verdict"] == "promoted" and data["exit_code"] == 0
    assert data["champion"] == {"model_name": MODEL, "before": None, "after": 1, "changed": True}
    assert "pulled from the default DVC remote" in data["pull"]
    assert registry(repo) == (1, 1)
    assert "Champion changed: yes" in md and "**promoted**" in md
    assert "data:image/png;base64," in md and md.count("<img ") == 2
    assert len(md.encode()) <= 60_000  # one PR comment holds it whole
    assert data["images"]["train_curves"].startswith("data:image/png;base64,iVBOR")
    metrics = data["metrics_diff"]["reports/eval.json"]
    assert metrics["test_acc"]["old"] is None and metrics["test_acc"]["new"] > 0
    assert "| reports/eval.json | test_acc | — |" in md
    assert data["device_seconds"]["train_seconds"] > 0
    assert data["device_seconds"]["tune_trials"] == 1
    train = json.loads((repo / "reports" / "train.json").read_text())
    gap = train["best_train_acc"] - train["best_val_acc"]
    assert data["overfitting_gap"] == pytest.approx(gap)
    first_acc = json.loads((repo / "reports" / "eval.json").read_text())["test_acc"]
    # What a workflow does with a promoted model: push the outputs, commit the lock file.
    sh("dvc", "push", cwd=repo)
    commit(repo, "retrained")

    # (2) Nothing changed: DVC is up to date, nothing is trained, nothing registered.
    second = retrain(repo)
    assert second.returncode == 0, second.stderr[-4000:]
    md, data = reports(repo)
    assert data["stale_before"] == [] and data["stages_ran"] == [] and data["up_to_date"]
    assert not data["registered"] and data["verdict"] == "not run"
    assert data["champion"]["changed"] is False and data["champion"]["after"] == 1
    assert data["params_diff"] == {} and data["device_seconds"]["total_seconds"] == 0
    assert "Nothing to do" in md and "Stages that ran: none" in md
    assert registry(repo) == (1, 1)

    # (3) A change that makes the model worse, passed as a workflow would (CNNOPS_SET): batches
    # of 1024 leave one optimizer step in the epoch, far from the champion's ~20. It is trained,
    # registered as version 2, and loses the gate (registry.min_delta 0.005): exit 3.
    third = retrain(repo, env={"CNNOPS_SET": "train.batch_size=1024\n"})
    assert third.returncode == 3, third.stderr[-4000:]
    md, data = reports(repo)
    assert data["stages_ran"] == STAGES[2:] and data["registered"]
    assert data["verdict"] == "lost" and data["exit_code"] == 3
    assert data["gate"]["margin"] < 0.005
    assert data["champion"] == {"model_name": MODEL, "before": 1, "after": 1, "changed": False}
    assert registry(repo) == (2, 1)
    assert params_changed(data)["train.batch_size"]["old"] == 64
    assert params_changed(data)["train.batch_size"]["new"] == 1024
    assert list(params_changed(data)) == ["train.batch_size"]
    assert "| params.yaml | train.batch_size | 64 | 1024 |" in md
    assert "lost the gate" in md and "Champion changed: no" in md
    # The override went into params.yaml (comments kept) and dvc.lock recorded it.
    text = (repo / "params.yaml").read_text()
    assert text.startswith("# cnnops parameters") and "batch_size: 1024" in text
    assert "# weight_decay is the L2 penalty" in text and "max_epochs: 1" in text
    assert "batch_size: 1024" in (repo / "dvc.lock").read_text()

    # (4) A change that makes it better: eight epochs in batches of 64. Version 3 beats the
    # one-epoch champion (about 0.95 test accuracy) by more than min_delta and takes the alias.
    fourth = retrain(
        repo, "--set", "train.batch_size=64", "-S", "train.max_epochs=8", "--base", "HEAD"
    )
    assert fourth.returncode == 0, fourth.stderr[-4000:]
    md, data = reports(repo)
    assert data["verdict"] == "promoted" and data["registered"]
    assert data["champion"] == {"model_name": MODEL, "before": 1, "after": 3, "changed": True}
    assert data["gate"]["margin"] >= 0.005
    assert registry(repo) == (3, 3)
    assert list(params_changed(data)) == ["train.max_epochs"]
    assert params_changed(data)["train.max_epochs"]["new"] == 8
    assert data["metrics_diff"]["reports/eval.json"]["test_acc"]["old"] == first_acc
    assert "| params.yaml | train.max_epochs | 1 | 8 |" in md and "Champion changed: yes" in md
    assert json.loads(third.stdout)["exit_code"] == 3
    assert json.loads(fourth.stdout)["champion"]["after"] == 3


@pytest.mark.parametrize(
    ("args", "env", "culprit"),
    [
        (["--set", "model.dropout_fc=1.5"], {}, "--set model.dropout_fc=1.5"),
        (["-S", "model.no_such_key=1"], {}, "no_such_key"),
        # One KEY=VALUE a line: the first value holds a space and is valid; the second is not.
        ([], {"CNNOPS_SET": "model.fc=[128, 64]\nmodel.dropout_fc=1.5\n"}, "dropout_fc=1.5"),
        (["--base", "no-such-ref"], {}, "--base no-such-ref"),
        (["--pipeline", "pipelines/none"], {}, "--pipeline pipelines/none"),
        ([], {"CNNOPS_PIPELINE": "src"}, "--pipeline src"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, args: list[str], env: dict[str, str], culprit: str
) -> None:
    repo = init_repo(tmp_path, ["train.max_epochs=1"])
    commit(repo, "project")
    before = (repo / "params.yaml").read_bytes()
    result = retrain(repo, *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnops retrain: error: "), result.stderr
    assert culprit in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert (repo / "params.yaml").read_bytes() == before
    assert not (repo / "reports").exists() and not (repo / "dvc.lock").exists()
    assert sh("git", "status", "--porcelain", cwd=repo) == ""
