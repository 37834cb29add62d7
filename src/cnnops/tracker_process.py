"""MLflow in a process of its own, so that `cnnops train` does not wait for it.

Importing MLflow and opening its store (SQLAlchemy, the schema check, a new store's migrations)
takes one to four seconds: as long as a short training. `TrackerProcess(cfg)` starts that work
in a child process at once, while the training process goes on importing torch and Lightning;
`open` then creates or reopens the run there and returns the same object as the run's tracker.
Its calls travel through a pipe, in order; those whose caller must know the outcome (`open`,
`log_artifact`, whose file may move right after, and `close`) wait for the answer.

The child holds an ordinary `MlflowTracker`, so a server that goes away mid-run is handled as
before: calls are kept and replayed at `close`. The child ignores SIGINT and SIGTERM (the
training process decides how the run ends). If the training process dies without closing the
run, the child sends what it was given and leaves the run open, for a resume to reopen.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops.errors import CnnopsError
from cnnops.tracking import ClosesRun, TrackingError

if TYPE_CHECKING:
    from cnnops.config import Mlflow


class TrackerProcess(ClosesRun):
    """A `Tracker` whose MLflow calls run in a child process started on construction."""

    def __init__(self, cfg: Mlflow) -> None:
        # A fresh interpreter (not multiprocessing's spawn, which re-runs the caller's script):
        # two pipes, calls one way and answers the other.
        calls_read, calls_write = os.pipe()
        answers_read, answers_write = os.pipe()
        path = os.pathsep.join(p for p in sys.path if p)  # where this process found cnnops
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import {__name__} as m; m._main({calls_read}, {answers_write})",
            ],
            pass_fds=(calls_read, answers_write),
            env={**os.environ, "PYTHONPATH": path},
        )
        os.close(calls_read)
        os.close(answers_write)
        self._calls = Connection(calls_write, readable=False)
        self._answers = Connection(answers_read, writable=False)
        self._lost: str | None = None  # why the child cannot be reached, once it cannot
        self.run_id: str | None = None
        self._tell("start", cfg)

    def open(
        self, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> TrackerProcess:
        """Create the run, or reopen `run_id` where the store holds it (see `MlflowTracker`)."""
        self.run_id = self._ask("open", run_name, _plain(tags or {}), run_id)
        return self

    def end_run(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        """`tracking.end_run` on another run of the store, from the child."""
        self._ask("end_run", run_id, status, _plain(tags))

    # Plain values only cross the pipe (see `_plain`).
    def log_params(self, params: dict[str, Any]) -> None:
        self._tell("log_params", _plain(params))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        plain = {str(k): float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self._tell("log_metrics", plain, int(step))

    def log_image(self, key: str, image: Any, step: int) -> None:
        self._tell("log_image", key, image, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._tell("set_tags", _plain(tags))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._ask("log_artifact", Path(path), folder)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with `status`, after everything sent before; then the child leaves."""
        from cnnops.timings import phase

        try:
            with phase("mlflow: close"):
                self._ask("close", status)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Let the child go (an open run stays open) and wait for it."""
        self._calls.close()
        self._answers.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck on a server that does not answer
            self._process.kill()
            self._process.wait()

    def _tell(self, name: str, *args: Any) -> None:
        """Send a call without waiting; a failure comes back with the next `_ask`."""
        if self._lost is None:
            try:
                self._calls.send((name, args, False))
            except (OSError, ValueError) as e:
                self._lost = f"the MLflow process is gone ({e})"

    def _ask(self, name: str, *args: Any) -> Any:
        """Send a call and wait for its outcome (or for a failure of a call sent before)."""
        if self._lost is None:
            try:
                self._calls.send((name, args, True))
                kind, value = self._answers.recv()
            except (EOFError, OSError, ValueError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(timeout=5)
                self._lost = f"the MLflow process ended (exit status {self._process.returncode})"
        if self._lost is not None:
            raise TrackingError(
                f"MLflow run {self.run_id or '(not created)'}: {self._lost}; the stage's outputs "
                "are kept, rerun it to record the run"
            )
        if kind == "error":
            raise TrackingError(value)
        if kind == "crash":
            raise RuntimeError(f"the MLflow process failed:\n{value}")
        return value


def _plain(values: dict[str, Any]) -> dict[str, str]:
    """Keys and values as plain `str`: a subclass such as torch's version would make the child
    import torch to unpickle it, a second's work competing with the training."""
    return {str(k): str(v) for k, v in values.items()}


def _main(calls_fd: int, answers_fd: int) -> None:
    """The child: warm MLflow up, then carry out calls in order until `close` or the parent's
    end. A failure is answered at the next call that waits for an answer. A reader thread
    takes calls off the pipe as they come, so the training process never waits to send."""
    import signal

    from cnnops import tracking
    from cnnops.runs import exit_now

    os.environ.pop("CNNOPS_TIMINGS", None)  # the phases are the training process's to write
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    calls, answers = Connection(calls_fd, writable=False), Connection(answers_fd, readable=False)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(calls, inbox), daemon=True).start()
    client: Any = None
    warm_up: Exception | None = None
    tracker: tracking.MlflowTracker | None = None
    failure: tuple[str, str] | None = None
    held = bytearray()
    while (call := inbox.get()) is not None:  # None: the training process is gone
        name, args, wants_answer = call
        result = None
        try:
            if name == "start":
                (cfg,) = args
                with _held_stderr() as held:  # shown once a run is opened, not before
                    try:
                        client = tracking.client(cfg)  # imports MLflow, opens the store
                        tracking.experiment_id(client, cfg)
                    except Exception as e:  # answered when the run is opened
                        warm_up = e if tracking.refusal(e) else _unopened(cfg, e)
            elif name == "open":
                os.write(2, bytes(held))  # e.g. MLflow creating the store's tables
                if warm_up is not None:
                    raise warm_up
                run_name, tags, run_id = args
                tracker = tracking.MlflowTracker(
                    cfg, run_name, tags=tags, run_id=run_id, mlflow_client=client
                )
                result = tracker.run_id
            elif name == "end_run":
                tracking.end_run(cfg, *args)
            else:
                getattr(tracker, name)(*args)
        except Exception as e:
            failure = failure or _portable(e)
        if name == "close":
            tracker = None
        if wants_answer:
            answers.send(failure or ("ok", result))
            failure = None
            if name == "close":
                break
    if tracker is not None:  # left without `close`: what was sent goes out, the run stays open
        tracker.flush()
    # Now, not after Python's teardown: the training process may be waiting to exit itself
    # (Lightning's DDP launcher kills a rank 0 that outlives its ranks for long).
    exit_now(0)


@contextlib.contextmanager
def _held_stderr() -> Iterator[bytearray]:
    """Standard error of the block, kept and handed back as bytes after it: a command that
    fails before it opens a run prints only its own line, not what MLflow said warming up."""
    out = bytearray()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            out += held.read()


def _read(calls: Connection, inbox: queue.SimpleQueue[Any]) -> None:
    while True:
        try:
            inbox.put(calls.recv())
        except (EOFError, OSError):
            inbox.put(None)
            return


def _unopened(cfg: Mlflow, error: Exception) -> TrackingError:
    from cnnops.tracking import first_line, uri_source

    return TrackingError(
        f"{uri_source(cfg)}: the MLflow store cannot be opened ({first_line(error)}); give a "
        "store this machine can create or reach"
    )


def _portable(error: Exception) -> tuple[str, str]:
    """An exception as the parent can raise it: a user-fixable one as its line, others whole."""
    from cnnops.tracking import refusal

    if isinstance(error, CnnopsError):
        return "error", str(error)
    message = refusal(error)
    if message is not None:
        return "error", message
    return "crash", "".join(traceback.format_exception(error))
