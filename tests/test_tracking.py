"""A tracking server that is down or goes away: fail fast at the start, keep training and replay
the run when it comes back, or one line and a non-zero exit with the outputs kept."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import pytest

from cnnops import tracking
from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.data.sources import fetch
from cnnops.train import train
from tests.mlflow_server import free_port, mlflow_server


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung server, not a refused one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.mark.parametrize(("command", "server"), [("train", "hung"), ("tune", "refused")])
def test_an_unreachable_server_fails_the_stage_at_once_with_one_line(
    workdir: Path, server: str, command: str, request: pytest.FixtureRequest
) -> None:
    port = request.getfixturevalue("silent_port") if server == "hung" else free_port()
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    result = cnnops_env(command, workdir, uri)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"cnnops {command}: error: MLFLOW_TRACKING_URI={uri}:"), err
    assert "does not answer" in err
    assert elapsed < 30


def cnnops_env(command: str, folder: Path, uri: str):  # noqa: ANN201
    import os
    import subprocess

    from tests.conftest import BIN

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [str(BIN / "cnnops"), command], cwd=folder, env=env, capture_output=True, text=True
    )


class StopServerAfter(L.Callback):
    """Stops the tracking server at the end of epoch `epoch`, mid-training."""

    def __init__(self, server: ExitStack, epoch: int) -> None:
        self.server, self.epoch = server, epoch

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.server.close()


def test_a_server_that_goes_away_mid_training_gets_the_run_replayed(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(workdir / "params.yaml", ["train.max_epochs=3", "model.fc=[16]"])
    fetch(config.fetch, config.paths.raw)
    prepare.prepare(config, config.paths.raw, config.paths.prepared, workdir / "data.json")
    data = prepare.load(config.paths.prepared)
    folder, port = tmp_path_factory.mktemp("server"), free_port()

    server = ExitStack()
    url = server.enter_context(mlflow_server(folder, port=port))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracker = tracking.MlflowTracker(config.mlflow, "train")
    run_id = tracker.run_id
    tracker.log_params({"train.max_epochs": 3})
    result = train(config, data, workdir / "out", tracker, [StopServerAfter(server, 1)])

    # Training finished and kept its checkpoints although the server went away after epoch 1.
    assert result.metrics["epochs_run"] == 3 and result.best_checkpoint.is_file()
    tracker.flush()  # the epochs' metrics go out on a sender thread
    assert tracker.down is not None
    tracker.log_metrics(result.metrics, step=3)

    # Still away when the run closes: one line naming the run, nothing lost.
    with pytest.raises(tracking.TrackingError) as failed:
        tracker.close()
    message = str(failed.value)
    assert "\n" not in message and run_id in message and "outputs are kept" in message
    assert result.best_checkpoint.is_file()

    # Back (same store, same port): closing again replays what it missed, in order.
    with mlflow_server(folder, port=port):
        tracker.close()
        client = tracking.client(config.mlflow)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert {m.step for m in client.get_metric_history(run_id, "val/loss")} == {1, 2, 3}
        assert run.data.metrics["epochs_run"] == 3
        assert run.data.params["train.max_epochs"] == "3"


def test_the_fluent_api_sees_the_project_store_inside_the_block_and_nothing_changes_after(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    config = load_config(workdir / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # restored after, as it was
    before = mlflow.get_tracking_uri()
    with tracking.fluent(config.mlflow):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == "sqlite:///mlflow.db"
    assert mlflow.get_tracking_uri() == before
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"} & set(os.environ)

    # A registry a caller chose for the whole process is swapped for the block, then restored.
    try:
        mlflow.set_registry_uri("sqlite:///elsewhere.db")
        with tracking.fluent(config.mlflow):
            assert mlflow.get_registry_uri() == "sqlite:///mlflow.db"
        assert mlflow.get_registry_uri() == "sqlite:///elsewhere.db"
    finally:
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_a_run_made_and_fed_on_another_thread_gets_every_call_in_order(workdir: Path) -> None:
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    config = load_config(workdir / "params.yaml")
    calls: list[Future] = []
    threads: set[int] = set()

    def submit(fn):  # noqa: ANN001, ANN202
        def call():  # noqa: ANN202
            threads.add(threading.get_ident())
            return fn()

        calls.append(pool.submit(call))
        return calls[-1]

    with ThreadPoolExecutor(1) as pool:
        run = tracking.OnThread(
            submit, lambda: tracking.MlflowTracker(config.mlflow, "thread", system_metrics=False)
        )
        run.log_params({"lr": 0.01})
        for step in (1, 2, 3):
            run.log_metrics({"val_loss": 1 / step}, step)
        run.set_tags({"optuna.state": "pruned"})
        run.close("KILLED")
        run_id = run.run_id
        for call in calls:
            call.result()
    assert threads and threading.get_ident() not in threads
    client = tracking.client(config.mlflow)
    got = client.get_run(run_id)
    assert got.info.status == "KILLED"
    assert got.data.params["lr"] == "0.01" and got.data.tags["optuna.state"] == "pruned"
    history = client.get_metric_history(run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]

    # A run that could not be made: its id raises what making it raised; the queue goes on.
    def unmade() -> tracking.MlflowTracker:
        raise RuntimeError("store refused")

    with ThreadPoolExecutor(1) as pool:
        broken = tracking.OnThread(pool.submit, unmade)
        later = broken._submit(lambda: None)
        broken.close()
        with pytest.raises(RuntimeError, match="store refused"):
            broken.run_id  # noqa: B018
    assert later.result() is None
