"""`dvc repro` end to end through register → evaluate → promote, in a temporary git repo."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, cnnops, set_params
from tests.test_registry import BETTER, FIRST, WORSE


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def aliases(repo: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    model = MlflowClient(uri, uri).get_registered_model("cnnops-digits")
    return {alias: str(version) for alias, version in model.aliases.items()}


@pytest.fixture
def repo(workdir: Path) -> Path:
    shutil.copy(ROOT / "dvc.yaml", workdir / "dvc.yaml")
    shutil.copytree(
        ROOT / "src" / "cnnops",
        workdir / "src" / "cnnops",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # The gate scenario is about the train candidate; one quick tuning trial keeps the stage honest.
    quick_tune = ["registry.candidates=[train]", "tune.n_trials=1"]
    set_params(workdir / "params.yaml", ["train.accelerator=cpu", *quick_tune, *FIRST])
    run("git", "init", "-q", cwd=workdir)
    run("dvc", "init", "-q", cwd=workdir)
    (workdir / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    run("git", "add", "-A", cwd=workdir)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=workdir)
    return workdir


@pytest.mark.slow
def test_repro_registers_champion_keeps_it_against_worse_promotes_better_and_rolls_back(
    repo: Path,
) -> None:
    run("dvc", "repro", cwd=repo)
    assert aliases(repo) == {"challenger": "1", "champion": "1"}
    pointer = json.loads((repo / "models/registry.json").read_text())
    assert pointer["version"] == 1 and pointer["aliases"] == {"challenger": 1, "champion": None}
    assert json.loads((repo / "reports/promotion.json").read_text())["promoted"] is True
    assert (repo / "models/champion.onnx").stat().st_size > 0
    assert (repo / "reports/eval_misclassified.png").is_file()

    run("dvc", "repro", cwd=repo)  # nothing changed: nothing registered
    assert aliases(repo) == {"challenger": "1", "champion": "1"}

    set_params(repo / "params.yaml", WORSE)
    run("dvc", "repro", cwd=repo)
    assert aliases(repo) == {"challenger": "2", "champion": "1"}
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["promoted"] is False and promotion["champion_version"] == 1

    set_params(repo / "params.yaml", BETTER)
    run("dvc", "repro", cwd=repo)
    assert aliases(repo) == {"challenger": "3", "champion": "3"}
    metrics = json.loads(run("dvc", "metrics", "show", "--json", cwd=repo))
    assert "reports/eval.json" in json.dumps(metrics)

    result = cnnops("rollback", cwd=repo, check=True)
    assert json.loads(result.stdout)["champion_version"] == 1
    assert aliases(repo)["champion"] == "1"

    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    tags = MlflowClient(uri, uri).get_model_version("cnnops-digits", "3").tags
    assert tags["dvc.data/prepared"] and tags["dvc.models/train"]
    assert tags["rollback.to"] == "1" and tags["promotion.previous_champion"] == "1"
