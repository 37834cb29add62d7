"""The one module that talks to MLflow; the rest of the code logs through a `Tracker`."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cnnops.config import Mlflow


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Does nothing, so code that logs needs no `if tracker:`."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def tracking_uri(cfg: Mlflow) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def client(cfg: Mlflow) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg), registry_uri=tracking_uri(cfg))


def experiment_id(c: MlflowClient, cfg: Mlflow) -> str:
    from mlflow.exceptions import MlflowException

    found = c.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    uri = tracking_uri(cfg)
    # A database backend keeps artifacts wherever the experiment says; default to a local folder.
    local = uri.startswith(("sqlite:", "postgresql:", "mysql:")) or "://" not in uri
    location = Path(cfg.artifact_location).resolve().as_uri() if local else None
    try:
        return c.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:  # another worker created it first
        return c.get_experiment_by_name(cfg.experiment).experiment_id  # type: ignore[union-attr]


class MlflowTracker:
    """One MLflow run; metrics go out asynchronously and are flushed on `close`. As a context
    manager it closes the run FINISHED, or FAILED when the block raises."""

    def __init__(
        self,
        cfg: Mlflow,
        run_name: str,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.client = client(cfg)
        self._pending: list[Any] = []
        self._sender: Any = None
        if run_id:  # reopen an existing run, e.g. a study's parent run on resume
            self.run_id: str = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags or {})
            return
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(
            experiment_id(self.client, cfg), run_name=run_name, tags=all_tags
        )
        self.run_id = run.info.run_id

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close("FINISHED" if kind is None else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """The numbers of `metrics`; other values (None, text) are not metrics and stay out."""
        import time
        from concurrent.futures import ThreadPoolExecutor

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)
        ]
        if not batch:
            return
        # One sender thread of our own keeps the epochs in order and training never waits on the
        # store. (MLflow's `synchronous=False` queue costs a fixed second at every run's end: its
        # worker polls with a one-second timeout before it can be joined.)
        self._sender = self._sender or ThreadPoolExecutor(1, thread_name_prefix="cnnops-mlflow")
        self._pending.append(self._sender.submit(self.client.log_batch, self.run_id, metrics=batch))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        for sent in self._pending:
            sent.result()
        self._pending.clear()
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
        self.client.set_terminated(self.run_id, status)


def end_run(cfg: Mlflow, run_id: str, status: str, tags: dict[str, str]) -> None:
    """Tag and terminate a run left open by a process that died."""
    from mlflow.entities import RunTag

    c = client(cfg)
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    c.set_terminated(run_id, status)


def child_runs(cfg: Mlflow, parent_run_id: str) -> list[Any]:
    """The runs nested under `parent_run_id`."""
    c = client(cfg)
    parent = c.get_run(parent_run_id)
    return c.search_runs(
        [parent.info.experiment_id],
        max_results=10000,
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )


def git_commit(cwd: Path = Path()) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_hashes(inputs: list[Path], lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """The dvc.lock hashes recorded for `inputs` (outputs of earlier stages)."""
    if not lock.is_file():
        return {}
    from cnnops.config import read_params

    wanted = {p.as_posix().rstrip("/") for p in inputs}
    found = {}
    for stage in (read_params(lock).get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path = str(out.get("path", "")).rstrip("/")
            if path in wanted:
                found[f"dvc.{path}"] = out.get("md5") or out.get("hash") or "unknown"
    return found


def environment() -> dict[str, str]:
    import torch

    tags = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        tags["device"] = torch.cuda.get_device_name(0)
    return tags
