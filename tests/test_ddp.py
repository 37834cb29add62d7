"""Plain DDP over two CPU processes (gloo) trains like one process, and records one run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import cnnops, set_args

pytestmark = pytest.mark.slow


def train_json(*overrides: str) -> dict:
    sets = set_args("train.accelerator=cpu", "train.max_epochs=12", *overrides)
    cnnops("train", *sets, check=True)
    with Path("reports/train_curves.csv").open() as f:
        first_lr = float(next(csv.DictReader(f))["lr"])
    return {**json.loads(Path("reports/train.json").read_text()), "first_lr": first_lr}


def test_two_process_ddp_matches_one_process(workdir: Path) -> None:
    cnnops("fetch", check=True)
    cnnops("prepare", check=True)
    single = train_json()
    ddp = train_json("train.devices=2", "train.strategy=ddp", "train.optimizer.lr_scaling=sqrt")
    assert ddp["first_lr"] == pytest.approx(single["first_lr"] * 2**0.5)  # the global batch rule
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


DDP_STUDY = [
    "train.accelerator=cpu",
    "train.devices=2",
    "train.strategy=ddp",
    "train.max_epochs=3",
    "train.early_stopping.enabled=false",
    "model.conv=[{filters: 8}]",
    "model.fc=[16]",
    "tune.n_trials=4",
    "tune.pruner.startup_trials=1",
    "tune.pruner.warmup_epochs=0",
    "tune.sampler.startup_trials=2",
    "tune.space.lr=[0.00001, 0.03]",
]


def test_a_study_of_two_process_ddp_trials_prunes_and_records_each_trial_once(
    workdir: Path,
) -> None:
    from cnnops import tracking
    from cnnops.config import load_config

    cnnops("fetch", check=True)
    cnnops("prepare", check=True)
    overrides = DDP_STUDY
    cnnops("tune", *set_args(*overrides), check=True)
    config = load_config(Path("params.yaml"), overrides)
    study = _study(overrides)
    trials = study.trials
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and set(states) <= {"COMPLETE", "PRUNED"}, states
    assert "PRUNED" in states, states  # rank 0's pruning decision stopped both ranks
    for t in trials:  # rank 0 reported every epoch it trained, and only rank 0 did
        epochs = sorted(t.intermediate_values)
        assert epochs == list(range(len(epochs)))
        assert len(epochs) == 3 if t.state.name == "COMPLETE" else 1 <= len(epochs) <= 3
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = tracking.child_runs(config.mlflow, parent)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if b"cnnops.ddp_trials" in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_ddp_rank_that_dies_stops_its_worker_at_once_and_the_rerun_finishes(
    workdir: Path,
) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import BIN

    cnnops("fetch", check=True)
    cnnops("prepare", check=True)
    overrides = [*DDP_STUDY, "train.max_epochs=6"]
    sets = set_args(*overrides)
    proc = subprocess.Popen(
        [str(BIN / "cnnops"), "tune", *sets],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(Path("models/optuna").rglob("last.ckpt")):
        time.sleep(0.2)  # a trial is under way on both ranks
    followers = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b"cnnops.ddp_trials" in _read(p) and int(p.parent.name) in running_in_group(proc.pid)
    ]
    assert len(followers) == 1
    os.kill(followers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # not the process group's half-hour timeout
    assert proc.returncode != 0, err
    assert "rank 1 of this worker's DDP group exited with status -9; the worker stops" in err
    assert "Traceback" not in err
    assert not running_in_group(proc.pid)
    cnnops("tune", *sets, check=True)  # the trial that was running is recovered and finished
    study = _study(overrides)
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and len(states) == 5, states
    retried = [t for t in study.trials if t.system_attrs.get("retry_history")]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")


def _study(overrides: list[str]):  # noqa: ANN202 - an optuna Study
    import optuna

    from cnnops import studies
    from cnnops.config import load_config

    config = load_config(Path("params.yaml"), overrides)
    storage = studies.open_storage(studies.storage_url(config), print)
    name = studies.study_name(config, config.paths.prepared)
    return optuna.load_study(study_name=name, storage=storage)
