"""Trials trained together (`tune.trials_at_once`): a study of trials trained at once reaches
what the same trials reach one by one, and keeps the study's bookkeeping, through a signal and a
kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cnnops import fused, studies, tracking
from cnnops.checkpoints import load_classifier
from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.errors import ConfigError
from cnnops.timings import seconds_by_phase
from tests.conftest import ROOT, cnnops
from tests.mlflow_server import free_port, mlflow_server
from tests.test_tune_e2e import finished, open_study, sets, start_tune, states


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=16-mixed", "16-mixed"),
        ("train.strategy=ddp", "DDP"),
        ("augment.engine=albumentations", "batched engine"),
        ("train.cuda_graphs_optimizer=true", "without the optimizers"),
    ],
)
def test_settings_that_cannot_be_fused_are_refused_by_key(override: str, message: str) -> None:
    config = load_config(
        ROOT / "params.yaml",
        ["tune.trials_at_once=4", "augment.transforms=[{name: affine, p: 0.5}]", override],
    )
    with pytest.raises(ConfigError, match=rf"^tune.trials_at_once = 4: .*{message}"):
        fused.check(config)
    fused.check(load_config(ROOT / "params.yaml", ["tune.trials_at_once=4"]))  # the defaults fuse


@pytest.mark.slow
def test_a_fused_study_finishes_n_trials_with_runs_and_checkpoints_like_sequential_ones(
    digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # samples in a short study
    monkeypatch.setenv("CNNOPS_TIMINGS", str(digits / "timings.json"))
    overrides = ("tune.n_trials=5", "train.max_epochs=3", "tune.trials_at_once=3")
    spawned = time.time()
    out = cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    summary = json.loads(out.stdout)
    study = open_study(digits, *overrides)
    assert finished(study) == 5 and len(study.trials) == 5
    starts = sorted(t.datetime_start for t in study.trials)
    ends = sorted(t.datetime_complete for t in study.trials)
    assert starts[2] < ends[0]  # three trials ran at once
    # The best trial's checkpoint is the train stage's, holding the weights of its best epoch.
    run = json.loads((digits / "models" / "tune" / "run.json").read_text())
    assert run["trial"] == summary["best_trial"] and run["trials_at_once"] == 3
    module = load_classifier(digits / "models" / "tune" / "best.ckpt")
    val = prepare.load(digits / "data" / "prepared")
    proba = module.predict_images(val.x["val"])
    assert np.mean(proba.argmax(1) == val.y["val"]) == pytest.approx(run["best_val_acc"], abs=1e-6)
    # One MLflow run per trial, with the study's states and each epoch's curves.
    cfg = load_config(digits / "params.yaml").mlflow
    client = tracking.client(cfg)
    for trial in study.trials:
        child = client.get_run(trial.user_attrs["mlflow_run_id"])
        state = {"COMPLETE": "complete", "PRUNED": "pruned"}[trial.state.name]
        assert child.data.tags["optuna.state"] == state
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert [m.step for m in history] == list(range(1, len(trial.intermediate_values) + 1))
        # The trials share the process: the study's run samples the system, not each trial's.
        assert not any(k.startswith("system/") for k in child.data.metrics)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert "system/cpu_utilization_percentage" in parent.data.metrics
    # Where the study's seconds went, for benchmarks/tune_speed.py: every phase, in order.
    phases = seconds_by_phase(digits / "timings.json", spawned)
    names = ["config", "import", "study: open", "trials: setup", "trials: start"]
    names += ["trials: train steps", "trials: validate", "trials: epoch end", "trials: finish"]
    names += ["study: outputs: plots", "study: outputs"]
    assert [n for n in phases if n in names] == names, phases
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["trials: train steps"] > phases["trials: start"]


TWO_LONG = (
    "tune.n_trials=3",
    "train.max_epochs=20",
    "train.early_stopping.enabled=false",
    "tune.pruner.name=none",
    "tune.trials_at_once=2",
)
"""A study whose first two trials train together for long enough to be stopped midway."""


def start_two(
    folder: Path,
    stderr: int = subprocess.DEVNULL,
    overrides: tuple[str, ...] = TWO_LONG,
    running: int = 2,
) -> subprocess.Popen:
    """`cnnops tune` with TWO_LONG (or `overrides`), returned once `running` trials have
    finished an epoch."""
    proc = start_tune(folder, overrides, stderr=stderr)
    journal = folder / "models" / "optuna" / "studies.journal"
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.2)
        study = open_study(folder, *overrides) if journal.is_file() else None
        if study and sum(bool(t.intermediate_values) for t in study.trials) == running:
            break
    return proc


@pytest.mark.slow
def test_sigterm_requeues_every_running_trial_and_the_rerun_resumes_them(
    digits: Path,
) -> None:
    overrides = TWO_LONG
    proc = start_two(digits, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("cnnops tune: interrupted by SIGTERM; 0 of 3")
    study = open_study(digits, *overrides)
    assert states(study) == {"FAIL": 2, "WAITING": 2}
    client = tracking.client(load_config(digits / "params.yaml").mlflow)
    for trial in study.trials[:2]:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"

    cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    assert states(study) == {"FAIL": 2, "COMPLETE": 3}
    # The interrupted trials ran again with their own params, from their last finished epoch.
    for killed in study.trials[:2]:
        retry = next(t for t in study.trials[2:] if t.params == killed.params)
        run = client.get_run(retry.user_attrs["mlflow_run_id"])
        assert run.data.tags["cnnops.resumed_from"].endswith(
            f"trial-{killed.number}/last-fused.ckpt"
        )
        assert retry.user_attrs["metrics"]["epochs_run"] == 20  # the epochs before, counted
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert steps == list(range(len(killed.intermediate_values) + 1, 21))


@pytest.mark.slow
def test_a_sigkilled_fused_study_resumes_each_trial_from_its_last_written_epoch(
    digits: Path,
) -> None:
    overrides = TWO_LONG
    proc = start_two(digits)
    study = open_study(digits, *overrides)
    saved = [
        digits / "models" / "optuna" / study.study_name / f"trial-{n}" / fused.RESUME
        for n in (0, 1)
    ]
    deadline = time.time() + 120
    while not all(p.is_file() for p in saved) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert states(open_study(digits, *overrides)).get("RUNNING") == 2
    epochs = [len(torch.load(p, weights_only=True)["rows"]) for p in saved]
    assert all(epochs)

    cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    s = states(study)
    assert finished(study) == 3 and "RUNNING" not in s and "WAITING" not in s
    assert s["FAIL"] == 2
    # Each killed trial ran again from the last epoch its writer finished, not from its first.
    client = tracking.client(load_config(digits / "params.yaml").mlflow)
    for killed, done, path in zip(study.trials[:2], epochs, saved, strict=True):
        retry = next(t for t in study.trials[2:] if t.params == killed.params)
        run = client.get_run(retry.user_attrs["mlflow_run_id"])
        assert run.data.tags["cnnops.resumed_from"].endswith(str(path.relative_to(digits)))
        assert retry.user_attrs["metrics"]["epochs_run"] == 20
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert steps == list(range(done + 1, 21))
    # A trial that ended leaves no resume checkpoint behind.
    assert not list((digits / "models" / "optuna").glob(f"*/trial-[2-9]*/{fused.RESUME}"))


def test_a_snapshot_keeps_the_weights_and_the_best_weights_of_its_epoch(tmp_path: Path) -> None:
    # Epoch by epoch a trial's resume snapshot holds its weights and its best weights as they
    # were; the best epoch's weights are its snapshot's copy, shared until a better epoch
    # replaces them, and a trial that ends on its best epoch keeps the weights it ends with.
    net = torch.nn.Linear(3, 2)
    net.hparams = {}  # what a Classifier's checkpoint records of it
    slot = fused.Slot(
        None, None, net, torch.optim.SGD(net.parameters(), lr=0.1), None, False, None, None
    )  # type: ignore[arg-type]

    def epoch(value: float, improved: bool) -> dict:
        with torch.no_grad():
            net.weight.fill_(value)
        slot.best_row, slot.best_is_last = {"epoch": value}, improved
        return slot.take_snapshot()

    first, second, third = epoch(1.0, True), epoch(2.0, False), epoch(3.0, True)
    for snapshot, weight, best in ((first, 1.0, 1.0), (second, 2.0, 1.0), (third, 3.0, 3.0)):
        assert torch.all(snapshot["state_dict"]["weight"] == weight)
        assert torch.all(snapshot["best_state"]["weight"] == best)
    assert second["best_state"] is first["best_state"] is first["state_dict"]
    assert epoch(4.0, False)["best_state"] is third["best_state"]
    with torch.no_grad():
        net.weight.fill_(5.0)
    # It ends after an epoch that was not its best: the best epoch's copy.
    saved = torch.load(fused._save_best(slot, tmp_path), weights_only=True)
    assert torch.all(saved["state_dict"]["weight"] == 3.0)
    slot.best_is_last = True  # it ends on its best epoch: the weights it ends with
    saved = torch.load(fused._save_best(slot, tmp_path), weights_only=True)
    assert torch.all(saved["state_dict"]["weight"] == 5.0)


@pytest.mark.slow
def test_trials_trained_together_score_as_trials_trained_one_by_one(digits: Path) -> None:
    # Levers without randomness (no dropout, no noise), one trial with batch norm and L1 off,
    # one without batch norm and with L1: trained at once, they must reach the values they reach
    # one by one (on a GPU too: deterministic kernels, streams and the captured step).
    levers = [
        {"batch_norm": True, "lr": 3e-3, "weight_decay": 1e-4, "l1": 0.0},
        {"batch_norm": False, "lr": 5e-3, "weight_decay": 1e-3, "l1": 1e-5},
    ]
    fixed = {"dropout_conv": 0.0, "dropout_fc": 0.0, "noise_std": 0.0}
    values = {}
    for at_once in (1, 2):
        overrides = (
            "tune.n_trials=2",
            "train.max_epochs=3",
            "train.early_stopping.enabled=false",
            "tune.pruner.name=none",
            "train.deterministic=true",
            f"tune.trials_at_once={at_once}",
            f"tune.study_name=at-once-{at_once}",
        )
        storage = studies.open_storage(str(digits / "models/optuna/studies.journal"), print)
        study = optuna.create_study(study_name=f"at-once-{at_once}", storage=storage)
        for params in levers:
            study.enqueue_trial({**fixed, **params})
        cnnops("tune", *sets(*overrides), cwd=digits, check=True)
        study = open_study(digits, *overrides)
        values[at_once] = [t.value for t in study.trials]
    assert values[2] == pytest.approx(values[1], rel=1e-4)  # to float rounding


@pytest.mark.gpu
@pytest.mark.slow
def test_a_captured_fused_step_trains_as_the_eager_one(workdir: Path) -> None:
    from cnnops import tune
    from cnnops.data.sources import fetch

    base = load_config(workdir / "params.yaml")
    fetch(base.fetch, base.paths.raw)
    prepare.prepare(base, base.paths.raw, base.paths.prepared, base.paths.reports / "data.json")
    data = prepare.load(base.paths.prepared)
    values, graphed, train_acc = {}, {}, {}
    augmented = "augment.transforms=[{name: affine, p: 1.0}]"  # random: captured, not compared
    exact = "train.deterministic=true"  # cuDNN's fastest kernels add in any order
    for graphs, extra in (("false", [exact]), ("true", [exact]), ("augmented", [augmented])):
        name = f"graphs-{graphs}"
        config = load_config(
            workdir / "params.yaml",
            [
                "tune.n_trials=3",  # two at once, then the third alone: a new capture
                "train.max_epochs=3",
                "train.early_stopping.enabled=false",
                "tune.pruner.name=none",
                "tune.trials_at_once=2",
                f"train.cuda_graphs={'false' if graphs == 'false' else 'true'}",
                f"tune.study_name={name}",
                *extra,
            ],
        )
        url = studies.storage_url(config)
        study = optuna.create_study(study_name=name, storage=studies.open_storage(url, print))
        for lr in (3e-3, 1e-2, 5e-3):
            study.enqueue_trial(
                {"dropout_conv": 0.0, "dropout_fc": 0.0, "noise_std": 0.0, "lr": lr}
            )
        job = tune.Job(config, name, url)
        study = tune.open_study(job)
        try:
            fused.run(study, job, data)
        finally:
            torch.use_deterministic_algorithms(False)  # a process-wide flag, as Lightning sets it
        values[graphs] = [t.value for t in study.trials]
        graphed[graphs] = {t.user_attrs["metrics"]["cuda_graphs"] for t in study.trials}
        # The train sums too: a capture that made them would zero them on every replay.
        train_acc[graphs] = [t.user_attrs["metrics"]["best_train_acc"] for t in study.trials]
    assert graphed == {"false": {False}, "true": {True}, "augmented": {True}}
    assert values["true"] == pytest.approx(values["false"], rel=1e-3)
    assert train_acc["true"] == pytest.approx(train_acc["false"], rel=1e-3)
    assert min(train_acc["augmented"]) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("at_once", [1, 2])
def test_a_tracking_server_lost_mid_study_stops_it_in_one_line_and_the_rerun_finishes_it(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_once: int
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server answers at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    overrides = (
        "tune.n_trials=4",
        "train.max_epochs=60",
        "train.early_stopping.enabled=false",
        "tune.pruner.name=none",
        f"tune.trials_at_once={at_once}",
    )
    port = free_port()
    with mlflow_server(tmp_path / "mlflow", port=port) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        proc = start_two(digits, subprocess.PIPE, overrides, running=at_once)
    # The server is gone while the first trials train.
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"cnnops tune: error: MLFLOW_TRACKING_URI={url}: "), stderr
    study = open_study(digits, *overrides)
    assert "RUNNING" not in states(study), states(study)
    # Back on the same store, the rerun finishes the study: nothing recorded was lost.
    told = {t.number: t.state for t in study.trials if t.state.name != "FAIL"}
    with mlflow_server(tmp_path / "mlflow", port=port):
        cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    assert finished(study) == 4
    assert all(study.trials[n].state == state for n, state in told.items())


@pytest.mark.slow
def test_a_trial_left_by_a_lost_tracking_server_as_it_ends_is_failed_not_left_running(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two trials end on the same epoch. Once the first is told, the tracking server goes and
    # queued MLflow work fails: the second trial, out of the slots by then, meets that error as
    # it records its end. It must be told it failed, not left RUNNING, and the error ends the
    # study.
    from concurrent.futures import wait

    from cnnops import tune

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server answers at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    config = load_config(
        digits / "params.yaml",
        [
            "tune.n_trials=2",
            "train.max_epochs=1",
            "tune.pruner.name=none",
            "tune.trials_at_once=2",
            "tune.study_name=lost-at-the-end",
        ],
    )
    with ExitStack() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.enter_context(mlflow_server(tmp_path)))
        job = tune.Job(config, "lost-at-the-end", studies.storage_url(config))
        study = tune.open_study(job)
        together = fused.Fused(study, job, prepare.load(config.paths.prepared))
        other = tracking.MlflowTracker(config.mlflow, "another run", system_metrics=False)
        more = [
            tracking.MlflowTracker(config.mlflow, f"run {i}", system_metrics=False)
            for i in range(6)
        ]

        def first_told(study: optuna.Study) -> None:
            if len(study.trials) > 1 and study.trials[1].state.is_finished():
                return  # the second trial was told: the test fails below
            wait(together.writes)  # the first trial's run ended while the server was there
            server.close()
            together._record(other.close)  # MLflow work queued as the server went: it fails
            wait(together.writes)

        together.on_trial = first_told
        with pytest.raises(tracking.TrackingError):
            together.run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
        # Runs ended as a study stops, the server gone: each is ended, and none raises before
        # the trials are told.
        together._end_runs(
            [tracking.OnThread(together._record, lambda r=r: r) for r in more], "failed", "FAILED"
        )
        assert not together.writes
    assert all(run.down for run in more)  # each tried to close, and found the server gone
