"""Plain DDP over two CPU processes (gloo) trains like one process, and records one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import cnnops, set_args

pytestmark = pytest.mark.slow


def train_json(*overrides: str) -> dict:
    sets = set_args("train.accelerator=cpu", "train.max_epochs=12", *overrides)
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


@pytest.mark.parametrize("whom", ["every rank", "rank 0"])
def test_preempted_ddp_run_stops_every_rank_and_resumes(workdir: Path, whom: str) -> None:
    import os
    import signal
    import subprocess
    import time

    import torch

    from tests.conftest import BIN

    cnnops("fetch", check=True)
    cnnops("prepare", check=True)
    sets = set_args(
        "train.accelerator=cpu",
        "train.devices=2",
        "train.strategy=ddp",
        "train.max_epochs=8",
        "train.early_stopping.enabled=false",
    )
    proc = subprocess.Popen(
        [str(BIN / "cnnops"), "train", *sets],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    last = Path("models/train.partial/last.ckpt")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not last.is_file():
        time.sleep(0.2)
    if whom == "every rank":
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempts a job: every rank at once
    else:
        proc.send_signal(signal.SIGTERM)  # as `dvc repro` stops its stage: the others must follow
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    hint = "cnnops train: interrupted by SIGTERM; rerun `cnnops train`"
    assert any(line.startswith(hint) for line in err.splitlines()), err  # rank 0's line
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running_in_group(proc.pid):  # no rank trains on
        time.sleep(0.2)
    assert not running_in_group(proc.pid), "a DDP rank outlived the preempted run"
    done = int(torch.load(last, weights_only=True)["epoch"]) + 1
    assert 1 <= done < 8

    cnnops("train", *sets, check=True)
    metrics = json.loads(Path("reports/train.json").read_text())
    assert metrics["epochs_run"] == 8 and metrics["best_val_acc"] >= 0.9
    runs = MlflowClient().search_runs(experiment_ids=["1"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # resumed, not restarted
    assert runs[0].data.tags["cnnops.resumed_after_epoch"] == str(done)


def running_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found
