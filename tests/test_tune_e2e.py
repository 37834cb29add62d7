"""The tune stage end to end on digits: kill and resume, parallel workers, PostgreSQL, MLflow.

Tiny network, 1-3 epochs per trial: these check the bookkeeping, not the search quality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from cnnops import studies, tracking
from cnnops.config import load_config
from tests.conftest import BIN, cnnops, postgres_database, set_args

pytestmark = pytest.mark.slow

TINY = [
    "model.conv=[{filters: 8}]",
    "model.fc=[16]",
    "train.batch_size=128",
    "tune.pruner.startup_trials=1",
    "tune.pruner.warmup_epochs=0",
    "tune.sampler.startup_trials=2",
]


def sets(*overrides: str) -> list[str]:
    return set_args(*TINY, *overrides)


def start_tune(
    folder: Path, overrides: tuple[str, ...], stderr: int = subprocess.DEVNULL
) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "cnnops"), "tune", *sets(*overrides)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def open_study(folder: Path, *overrides: str) -> optuna.Study:
    config = load_config(folder / "params.yaml", [*TINY, *overrides])
    url = studies.storage_url(config)
    storage = studies.open_storage(url if studies.is_rdb(url) else str(folder / url), print)
    name = studies.study_name(config, folder / config.paths.prepared)
    return optuna.load_study(study_name=name, storage=storage)


def states(study: optuna.Study) -> dict[str, int]:
    found: dict[str, int] = {}
    for t in study.trials:
        found[t.state.name] = found.get(t.state.name, 0) + 1
    return found


def finished(study: optuna.Study) -> int:
    return states(study).get("COMPLETE", 0) + states(study).get("PRUNED", 0)


def test_tune_writes_outputs_and_one_mlflow_child_per_trial(digits: Path) -> None:
    args = sets("tune.n_trials=3", "train.max_epochs=2")
    out = cnnops("tune", *args, cwd=digits, check=True)
    summary = json.loads(out.stdout)
    reports, models = digits / "reports" / "tune", digits / "models" / "tune"
    for name in ("best_params.yaml", "trials.csv", "tune.json"):
        assert (reports / name).is_file()
    for plot in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (reports / f"{plot}.png").stat().st_size > 1000
        assert "<html>" in (reports / f"{plot}.html").read_text()
    run = json.loads((models / "run.json").read_text())
    assert {"mlflow_run_id", "best_val_acc", "best_val_loss", "best_epoch", "params"} <= set(run)
    assert (models / "best.ckpt").is_file()

    study = open_study(digits, "tune.n_trials=3", "train.max_epochs=2")
    assert finished(study) == 3 and summary["study"] == study.study_name
    cfg = load_config(digits / "params.yaml").mlflow
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = tracking.child_runs(cfg, parent)
    assert len(children) == len(study.trials) == 3
    by_id = {c.info.run_id: c for c in children}
    for trial in study.trials:
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        state = {"COMPLETE": "complete", "PRUNED": "pruned"}[trial.state.name]
        assert child.data.tags["optuna.state"] == state
        assert {f"hp.{k}" for k in trial.params} <= set(child.data.params)
    best_child = by_id[run["mlflow_run_id"]]
    assert "val/loss" in best_child.data.metrics  # the per-epoch curves
    parent_run = tracking.client(cfg).get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["best_value"] == pytest.approx(study.best_value)


def test_sigkilled_tune_resumes_to_exactly_n_trials_without_running_leftovers(digits: Path) -> None:
    # Trials long enough (20 full epochs) for the kill to land inside one.
    overrides = (
        "tune.n_trials=3",
        "train.max_epochs=20",
        "train.early_stopping.enabled=false",
        "tune.pruner.name=none",
    )
    proc = start_tune(digits, overrides)
    journal = digits / "models" / "optuna" / "studies.journal"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it while its second trial runs
        time.sleep(0.2)
        if journal.is_file():
            study = open_study(digits, *overrides)
            running = [t for t in study.trials if t.state.name == "RUNNING"]
            # Mid-trial: its MLflow run exists (not in the instant between ask and run start).
            if states(study).get("COMPLETE", 0) >= 1 and any(
                "mlflow_run_id" in t.user_attrs for t in running
            ):
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = open_study(digits, *overrides)
    assert states(killed).get("RUNNING") == 1

    cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    s = states(study)
    assert finished(study) == 3 and "RUNNING" not in s and "WAITING" not in s
    assert s["FAIL"] == 1
    retried = [t for t in study.trials if "failed_trial" in t.system_attrs]
    assert len(retried) == 1  # the killed trial ran again with its own params
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert retried[0].params == failed.params
    cfg = load_config(digits / "params.yaml").mlflow
    run = tracking.client(cfg).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "failed"


def test_sigterm_stops_tune_with_143_and_the_rerun_resumes_the_trial(digits: Path) -> None:
    overrides = (
        "tune.n_trials=2",
        "train.max_epochs=8",
        "train.early_stopping.enabled=false",
        "tune.pruner.name=none",
    )
    proc = start_tune(digits, overrides, stderr=subprocess.PIPE)
    trials = digits / "models" / "optuna"
    deadline = time.time() + 300
    while time.time() < deadline and not list(trials.glob("*/trial-0/last.ckpt")):
        time.sleep(0.2)  # an epoch of the first trial is checkpointed
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("cnnops tune: interrupted by SIGTERM; 0 of 2")
    study = open_study(digits, *overrides)
    assert states(study) == {"FAIL": 1, "WAITING": 1}  # failed, and queued again
    killed = study.trials[0]
    cfg = load_config(digits / "params.yaml").mlflow
    client = tracking.client(cfg)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"

    cnnops("tune", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    assert states(study) == {"FAIL": 1, "COMPLETE": 2}
    retry = study.trials[1]
    assert retry.params == killed.params
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["cnnops.resumed_from"].endswith("trial-0/last.ckpt")
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"


def test_three_workers_on_the_journal_finish_exactly_n_trials(digits: Path) -> None:
    overrides = ("tune.n_trials=5", "train.max_epochs=1")
    out = cnnops("tune", "--workers", "3", *sets(*overrides), cwd=digits, check=True)
    assert "lock" not in out.stderr.lower()
    study = open_study(digits, *overrides)
    assert finished(study) == 5 and len(study.trials) == 5
    workers = {t.user_attrs[studies.OWNER_KEY].split(":")[1] for t in study.trials}
    assert len(workers) > 1  # the trials really were shared


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database("cnnops_tune") as url:
        yield url.replace("+psycopg2", "")  # the plain form users write; cnnops picks the driver


def test_two_workers_share_one_study_on_postgresql(digits: Path, postgres_url: str) -> None:
    overrides = ("tune.n_trials=4", "train.max_epochs=1", f"tune.storage={postgres_url}")
    cnnops("tune", "--workers", "2", *sets(*overrides), cwd=digits, check=True)
    study = open_study(digits, *overrides)
    assert finished(study) == 4 and len(study.trials) == 4
    assert not (digits / "models" / "optuna" / "studies.journal").exists()
    assert (digits / "models" / "tune" / "best.ckpt").is_file()
