"""MLflow in a child process (`TrackerProcess`): calls arrive in order, the run ends as the
training process says, and a training process that dies leaves its run open with what it sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cnnops.config import Mlflow
from cnnops.tracker_process import TrackerProcess
from cnnops.tracking import TrackingError


def store(folder: Path) -> Mlflow:
    return Mlflow(
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        artifact_location=str(folder / "mlartifacts"),
    )


def gone(pid: int, timeout: float = 60) -> bool:
    """Whether process `pid` has ended within `timeout` seconds (it is not our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Mlflow:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return store(tmp_path)


def test_calls_reach_the_run_in_order_and_close_ends_it(cfg: Mlflow, tmp_path: Path) -> None:
    tracker = TrackerProcess(cfg).open("train", tags={"cnnops.stage": "train"})
    with tracker:
        tracker.log_params({"train.max_epochs": 5})
        for step in range(5):
            tracker.log_metrics({"val_acc": step / 10, "note": "not a number"}, step=step)
        tracker.set_tags({"git.commit": "abc"})
        artifact = tmp_path / "curves.csv"
        artifact.write_text("epoch,val_acc\n")
        tracker.log_artifact(artifact)
        artifact.unlink()  # it was uploaded before log_artifact returned
    assert tracker._process.returncode == 0
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.max_epochs": "5"}
    assert run.data.tags["cnnops.stage"] == "train" and run.data.tags["git.commit"] == "abc"
    history = client.get_metric_history(tracker.run_id, "val/acc")
    assert [(m.step, m.value) for m in history] == [(s, s / 10) for s in range(5)]
    assert "note" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["curves.csv"]


def test_a_failed_block_ends_the_run_failed_and_a_reopened_run_is_the_same(cfg: Mlflow) -> None:
    first = TrackerProcess(cfg).open("train")
    with pytest.raises(ZeroDivisionError), first:
        first.log_metrics({"val_acc": 0.5}, step=0)
        _ = 1 / 0
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    second = TrackerProcess(cfg).open("train", run_id=first.run_id)
    assert second.run_id == first.run_id
    second.close()
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_store_that_cannot_open_fails_at_open(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a-file").write_text("")
    tracker = TrackerProcess(Mlflow(tracking_uri=f"sqlite:///{tmp_path}/a-file/mlflow.db"))
    with pytest.raises(TrackingError, match=r"a-file/mlflow.db: the MLflow store cannot be opened"):
        tracker.open("train")
    tracker.shutdown()
    assert tracker._process.returncode == 0


def test_a_killed_trainer_leaves_its_run_open_with_what_it_sent(cfg: Mlflow) -> None:
    program = (
        "import os, signal, sys\n"
        "from cnnops.config import Mlflow\n"
        "from cnnops.tracker_process import TrackerProcess\n"
        "if __name__ == '__main__':\n"
        f"    tracker = TrackerProcess(Mlflow(tracking_uri={cfg.tracking_uri!r}))\n"
        "    tracker.open('train')\n"
        "    for step in range(3):\n"
        "        tracker.log_metrics({'val_acc': step / 10}, step=step)\n"
        "    print(tracker.run_id, tracker._process.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    script = Path("killed.py")
    script.write_text(program)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_id, child = done.stdout.split()
    assert gone(int(child)), "the MLflow process outlived the training process"
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # for a resume to reopen
    assert [m.value for m in client.get_metric_history(run_id, "val/acc")] == [0.0, 0.1, 0.2]


def test_only_plain_values_cross_so_the_child_never_loads_torch(
    cfg: Mlflow, tmp_path: Path
) -> None:
    import numpy as np
    import torch

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc")
    tracker = TrackerProcess(cfg).open("train")
    with tracker:
        tracker.set_tags({"torch": torch.__version__})  # a str subclass of torch's
        tracker.log_params({"size": np.int64(28)})
        tracker.log_metrics({"val_acc": np.float64(0.5), "lr": np.float32(0.25)}, step=np.int64(1))
        (tmp_path / "a.txt").write_text("a")
        tracker.log_artifact(tmp_path / "a.txt")  # waits: everything before it was handled
        loaded = Path(f"/proc/{tracker._process.pid}/maps").read_text()
        assert "libtorch" not in loaded, "the MLflow process loaded torch"
    run = MlflowClient(cfg.tracking_uri).get_run(tracker.run_id)
    assert run.data.tags["torch"] == str(torch.__version__)
    assert run.data.params["size"] == "28"
    assert run.data.metrics == {"val/acc": 0.5, "lr": 0.25}
