"""The `cnnops` command's way out: it leaves without Python's teardown, yet nothing that exit
handlers, buffered output or the exit status carry is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cnnops, set_args


def run_with_command(source: str, *args: str) -> subprocess.CompletedProcess:
    """`cnnops <args>` with one more command, defined by `source`, added to the app first."""
    program = (
        "import sys, typer\n"
        "from cnnops.cli import app\n"
        f"{source}\n"
        "from cnnops.__main__ import main\n"
        f"sys.argv = ['cnnops', *{list(args)!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)


def test_an_uncaught_error_exits_1_with_its_traceback() -> None:
    done = run_with_command(
        "@app.command()\ndef boom() -> None:\n    raise RuntimeError('boom in a command')",
        "boom",
    )
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: boom in a command" in done.stderr


def test_the_exit_status_and_piped_output_survive() -> None:
    # Piped stdout is block-buffered: what is still in the buffer at exit must come out.
    done = run_with_command(
        "@app.command()\ndef chatty() -> None:\n"
        "    for i in range(5000):\n        print(i)\n"
        "    import atexit\n    atexit.register(lambda: print('handler ran'))\n"
        "    raise typer.Exit(3)",
        "chatty",
    )
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:5000] == [str(i) for i in range(5000)] and lines[5000:] == ["handler ran"]


@pytest.mark.slow
def test_train_writes_its_phase_timings_and_metrics_on_the_way_out(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNOPS_TIMINGS", str(workdir / "timings.json"))
    cnnops("fetch", cwd=workdir, check=True)
    cnnops("prepare", cwd=workdir, check=True)
    args = set_args("train.max_epochs=1", "train.accelerator=cpu", "model.fc=[16]")
    done = cnnops("train", *args, cwd=workdir, check=True)
    metrics = json.loads(done.stdout)
    assert 0 <= metrics["best_val_acc"] <= 1
    # The timings are written by an exit handler registered mid-command: it ran.
    record = json.loads((workdir / "timings.json").read_text())
    phases = [p["phase"] for p in record["phases"]]
    for name in ("config", "import", "mlflow: open", "trainer setup", "fit", "mlflow: close"):
        assert name in phases, phases
    assert all(p["begin"] <= p["end"] <= record["exit"] for p in record["phases"])


@pytest.mark.slow
def test_a_store_that_cannot_be_opened_is_one_line_and_exit_2(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cnnops("fetch", cwd=workdir, check=True)
    cnnops("prepare", cwd=workdir, check=True)
    bad = f"sqlite:///{workdir / 'params.yaml'}/mlflow.db"  # under a file
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    done = cnnops("train", *set_args(f"mlflow.tracking_uri={bad}"), cwd=workdir)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"cnnops train: error: mlflow.tracking_uri = {bad}: the MLflow")
