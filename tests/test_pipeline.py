"""End to end: `dvc repro` in a fresh git repository, as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, git_dvc_project, set_params, sh

pytestmark = pytest.mark.slow
STAGES = ["fetch", "prepare", "train", "tune", "register", "evaluate", "promote"]


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '(?:[^']*:)?([a-z]+)'", log)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new git + DVC repository holding the project's pipeline files and code."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    set_params(tmp_path / "params.yaml", ["tune.n_trials=2"])  # the full study is benchmarked apart
    return git_dvc_project(tmp_path)


def test_repro_then_noop_then_experiment_reruns_only_train_and_evaluate(repo: Path) -> None:
    first = sh("dvc", "repro", cwd=repo)
    assert ran_stages(first) == STAGES
    assert json.loads((repo / "reports/eval.json").read_text())["test_acc"] >= 0.95
    assert (repo / "mlflow.db").is_file()

    second = sh("dvc", "repro", cwd=repo)
    assert ran_stages(second) == []
    assert "Data and pipelines are up to date" in second

    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline", cwd=repo)
    exp = sh("dvc", "exp", "run", "-S", "train.max_epochs=3", cwd=repo)
    assert ran_stages(exp) == STAGES[2:]
    assert json.loads((repo / "reports/train.json").read_text())["epochs_run"] <= 3

    metrics = sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert "test_acc" in metrics and "best_val_acc" in metrics
    diff = sh("dvc", "metrics", "diff", "HEAD", cwd=repo)
    assert "epochs_run" in diff
    plots = sh("dvc", "plots", "show", "-o", str(repo / "plots"), cwd=repo)
    assert (repo / "plots" / "index.html").is_file(), plots


def test_invalid_override_fails_the_stage_without_touching_outputs(repo: Path) -> None:
    sh("dvc", "repro", "prepare", cwd=repo)
    before = (repo / "reports/data.json").read_text()
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "prepared", cwd=repo)
    result = subprocess.run(
        ["dvc", "exp", "run", "-S", "model.dropout_fc=1.5"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "model.dropout_fc = 1.5" in result.stdout + result.stderr
    assert (repo / "reports/data.json").read_text() == before
    assert not (repo / "models" / "train" / "best.ckpt").exists()


def test_mnist_pipeline_reaches_985_on_cpu(
    tmp_path: Path, mnist_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    (repo / "pipelines").mkdir(parents=True)
    shutil.copytree(
        ROOT / "pipelines" / "mnist",
        repo / "pipelines" / "mnist",
        ignore=shutil.ignore_patterns(
            "data", "models", "reports", "mlflow.db", "mlartifacts", "tmp", "cache", "config.local"
        ),
    )
    for name in ("dvc.yaml", "params.yaml"):  # the root project beside it, as in the checkout
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = repo / "pipelines" / "mnist" / "params.yaml"
    # One tuning trial: the study itself is measured on a GPU (benchmarks/tune_speed.py).
    set_params(params, [f"fetch.mirror={mnist_mirror}", "tune.n_trials=1"])
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    # The variant is a DVC project of its own (`dvc init --subdir`): it runs from its folder.
    log = sh("dvc", "repro", cwd=repo / "pipelines" / "mnist")
    assert ran_stages(log) == STAGES
    result = json.loads((repo / "pipelines/mnist/reports/eval.json").read_text())
    assert result["test_samples"] == 10000
    assert result["test_acc"] >= 0.985
