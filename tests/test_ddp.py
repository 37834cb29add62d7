"""Plain DDP over two CPU processes (gloo) trains like one process, and records one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import cnnops

pytestmark = pytest.mark.slow


def train_json(*overrides: str) -> dict:
    sets = [
        a
        for o in ["train.accelerator=cpu", "train.max_epochs=12", *overrides]
        for a in ("--set", o)
    ]
    cnnops("train", *sets, check=True)
    return json.loads(Path("reports/train.json").read_text())


def test_two_process_ddp_matches_one_process(workdir: Path) -> None:
    cnnops("fetch", check=True)
    cnnops("prepare", check=True)
    single = train_json()
    ddp = train_json("train.devices=2", "train.strategy=ddp")
    assert ddp["epochs_run"] >= 1 and Path("models/train/best.ckpt").is_file()
    assert abs(ddp["best_val_acc"] - single["best_val_acc"]) <= 0.03
    assert ddp["best_val_acc"] >= 0.95
    runs = MlflowClient().search_runs(experiment_ids=["1"])
    assert len(runs) == 2  # one per command, not one per rank
    assert {r.data.params["train.devices"] for r in runs} == {"1", "2"}


def test_sync_batchnorm_on_cpu_is_a_config_error(workdir: Path) -> None:
    result = cnnops(
        "show-config", "--set", "train.accelerator=cpu", "--set", "train.sync_batchnorm=true"
    )
    assert result.returncode == 2 and "train.sync_batchnorm" in result.stderr
