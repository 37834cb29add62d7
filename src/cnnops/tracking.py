"""The one module that talks to MLflow; the rest of the code logs through a `Tracker`.

A tracking server that is down fails a stage at its start, within seconds, with one line
(`check_reachable`). One that goes away mid-run does not stop training: the tracker keeps what
it could not send and replays it when the run closes; if the server is still away then, the
stage's outputs are kept and it fails with one line naming the run (`TrackingError`).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from cnnops.errors import CnnopsError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from mlflow import MlflowClient

    from cnnops.config import Mlflow

# MLflow's defaults retry an unreachable server for minutes (7 retries, backoff 2, 120 s
# timeout). A user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
if not sys.stderr.isatty():  # a log file or CI: no artifact progress bars redrawn line by line
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class TrackingError(CnnopsError):
    """The MLflow tracking server cannot be reached."""


def first_line(error: BaseException) -> str:
    """An exception as one short line: MLflow's and requests' messages run to pages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def uri_source(cfg: Mlflow) -> str:
    """Where the store's URI comes from, and the URI (passwords masked): the culprit's name."""
    from cnnops.team import mask

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={mask(tracking_uri(cfg))}"
    return f"mlflow.tracking_uri = {mask(tracking_uri(cfg))}"


def _credentials() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        return "no MLFLOW_TRACKING_USERNAME is set"
    return f"MLFLOW_TRACKING_USERNAME={user}"


def _refused_credentials(where: str, what: str = "") -> str:
    """The one line for a 401: whose credentials, and where to set them."""
    return (
        f"{where} refused the credentials (401{what}, {_credentials()}): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server"
    )


def refusal(error: BaseException, uri: str | None = None) -> str | None:
    """One line for an MLflow server's refusal (401: who you are, 403: what you may do), or
    None when `error` is something else. mlflow is not imported for the question."""
    code = getattr(error, "error_code", None)
    if type(error).__name__ not in ("MlflowException", "RestException") or code not in (
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    ):
        return None
    from cnnops.team import mask

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    where = f"the MLflow server at {mask(uri)}" if uri else "the MLflow server"
    endpoint = re.search(r"endpoint (\S+)", str(error))
    what = f" on {endpoint.group(1)}" if endpoint else ""
    if code == "UNAUTHENTICATED":
        return _refused_credentials(where, what)
    return (
        f"{where} denied {_credentials()} (403{what}): the account may read but not change "
        "this; an admin grants EDIT or MANAGE on the experiment or registered model"
    )


def check_reachable(cfg: Mlflow, timeout: float = 4.0) -> None:
    """Fail fast, with one line, when the tracking server does not answer (http(s) only: the
    embedded stores are files)."""
    import time
    import urllib.error
    import urllib.request

    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    error: BaseException | None = None
    for attempt in range(2):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                break
        except urllib.error.HTTPError:
            break  # it answers: a server without /health, or behind auth, is still up
        except OSError as e:
            error = e
            if attempt == 0:
                time.sleep(1.0)
    else:
        assert error is not None
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"{uri_source(cfg)}: the MLflow tracking server does not answer ({reason}); start "
            "it, or unset MLFLOW_TRACKING_URI to use the embedded store"
        )
    _check_credentials(uri, cfg, timeout)


def _check_credentials(uri: str, cfg: Mlflow, timeout: float) -> None:
    """One authenticated read, so wrong credentials fail the stage now, in one line."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user, password = (
        os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    )
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise TrackingError(
                _refused_credentials(f"{uri_source(cfg)}: the MLflow server")
            ) from None
    except OSError:
        return  # answering /health but not this: the stage's own calls will say more


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def log_image(self, key: str, image: Any, step: int) -> None: ...
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

    def log_image(self, key: str, image: Any, step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class OnThread:
    """A tracker that `make` builds, and every call then runs, through `submit` (a single
    worker thread's, so calls keep their order): whoever logs never waits on the store. What a
    call raised comes out of the future `submit` returned; `run_id` waits for `make`."""

    def __init__(
        self, submit: Callable[[Callable[[], Any]], Future[Any]], make: Callable[[], Any]
    ) -> None:
        self._submit = submit
        self._made = submit(make)

    @property
    def run_id(self) -> str | None:
        return self._made.result().run_id

    def _later(self, name: str, *args: Any) -> None:
        self._submit(lambda: getattr(self._made.result(), name)(*args))

    def log_params(self, params: dict[str, Any]) -> None:
        self._later("log_params", params)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._later("log_metrics", metrics, step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._later("log_artifact", path, folder)

    def log_image(self, key: str, image: Any, step: int) -> None:
        self._later("log_image", key, image, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._later("set_tags", tags)

    def close(self, status: str = "FINISHED") -> None:
        self._later("close", status)


def tracking_uri(cfg: Mlflow) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def client(cfg: Mlflow) -> MlflowClient:
    """A client on the project's store, for runs and the registry alike."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg), registry_uri=tracking_uri(cfg))


def fluent(cfg: Mlflow) -> contextlib.AbstractContextManager[None]:
    """MLflow's fluent API (`mlflow.start_run`, `log_model`, `register_model`), which takes no
    URI, on the project's store for the block; what the process had before comes back after."""
    return scoped(tracking_uri(cfg))


@contextlib.contextmanager
def scoped(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI set to `uri` for the block, then put back.
    Also for calls that take a URI but resolve `models:/` with the process-wide registry."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(dict.fromkeys(names, uri))
    # A URI a caller set with mlflow.set_*_uri outranks the environment: swapped for the block.
    pairs = (
        (mlflow.get_tracking_uri, mlflow.set_tracking_uri),
        (mlflow.get_registry_uri, mlflow.set_registry_uri),
    )
    swapped = [(set_uri, get()) for get, set_uri in pairs if get() != uri]
    for set_uri, _ in swapped:
        set_uri(uri)
    try:
        yield
    finally:
        for set_uri, previous in swapped:
            set_uri(previous)
        for key, value in saved.items():  # after: set_tracking_uri writes the variable too
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ui_command(cfg: Mlflow, host: str, port: int) -> list[str] | None:
    """The `mlflow ui` command on the project's store; None for a tracking server, which has its
    own UI at its URL."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return None
    ui = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    return [*ui, "--host", host, "--port", str(port)]


def ui_url(cfg: Mlflow, base: str) -> str:
    """The page of the project's experiment in the MLflow UI at `base`: its runs table, in the
    UI's "Model training" view (`base` itself while the experiment does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client(cfg).get_experiment_by_name(cfg.experiment)
    except MlflowException:
        found = None
    if found is None:
        return base
    return f"{base.rstrip('/')}/#/experiments/{found.experiment_id}?workflowType=machine_learning"


# MLflow 3's UI opens an experiment on its GenAI overview (traces, evaluations) unless the
# experiment is of the kind "Machine learning": this tag, as the UI's own kind picker sets it.
# Where the UI has a GenAI / Model training switch, the switch decides instead, and `ui_url`
# names the Model training view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The curves as MLflow shows them: one chart section per split (train/, val/). The CSV and JSON
# reports keep the names DVC plots read (train_loss, val_acc, ...).
METRIC_NAMES = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
}


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
        return c.create_experiment(cfg.experiment, location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another worker created it first
        return c.get_experiment_by_name(cfg.experiment).experiment_id  # type: ignore[union-attr]


class ClosesRun:
    """As a context manager, a tracker closes its run FINISHED, KILLED when a signal stopped the
    block (`runs.Interrupted`), or FAILED; a failure to close then yields to the block's own."""

    def close(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        from cnnops.runs import Interrupted

        if kind is None:
            self.close("FINISHED")
            return
        with contextlib.suppress(TrackingError):  # the block's own exception says more
            self.close("KILLED" if issubclass(kind, Interrupted) else "FAILED")


class MlflowTracker(ClosesRun):
    """One MLflow run; metrics and images go out asynchronously and are flushed on `close`, and
    system metrics (CPU, memory, GPU) are sampled every second while it is open (unless
    `system_metrics` is false: a run that shares its process with others). As a context
    manager it closes the run FINISHED, KILLED when a signal stopped the block, or FAILED.

    If the server stops answering mid-run, calls are kept instead of raised, and replayed in
    order at `close`; `close` raises TrackingError when the server is still away then."""

    def __init__(
        self,
        cfg: Mlflow,
        run_name: str,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        mlflow_client: MlflowClient | None = None,
        system_metrics: bool = True,
    ) -> None:
        self.cfg = cfg
        self.client = mlflow_client or client(cfg)
        self._pending: list[Any] = []
        self._sender: Any = None
        self._backlog: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.down: str | None = None  # why the server stopped answering, while it does not
        reopened = bool(run_id) and self._reopen(str(run_id))
        if reopened:  # e.g. a study's parent run, or a resumed training
            self.run_id: str = str(run_id)
            self.set_tags(tags or {})
        else:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(
                experiment_id(self.client, cfg), run_name=run_name, tags=all_tags
            )
            self.run_id = run.info.run_id
        self._system = _system_monitor(cfg, self.run_id, reopened) if system_metrics else None

    def _reopen(self, run_id: str) -> bool:
        """Mark `run_id` RUNNING again; False when this store does not hold it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call the store; when it is down, keep the call for `close` to replay."""
        if self.down is not None:
            self._backlog.append((fn, args))
            return
        try:
            fn(*args)
        except Exception as e:  # requests, MLflow and OS errors alike mean: not recorded
            self.down = first_line(e)
            self._backlog.append((fn, args))
            print(
                f"warning: MLflow run {self.run_id} not recorded ({self.down}); training "
                "goes on and the run is replayed when it ends",
                file=sys.stderr,
                flush=True,
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call(self.client.log_batch, self.run_id, [], items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """The numbers of `metrics`; other values (None, text) are not metrics and stay out."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(METRIC_NAMES.get(k, k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, numbers.Real)
        ]
        if not batch:
            return
        # One sender thread of our own keeps the epochs in order and training never waits on the
        # store. (MLflow's `synchronous=False` queue costs a fixed second at every run's end: its
        # worker polls with a one-second timeout before it can be joined.)
        self._send(self.client.log_batch, self.run_id, batch)

    def log_image(self, key: str, image: Any, step: int) -> None:
        """An image (PIL, or uint8 H x W x C) as `key` at `step`: MLflow's UI shows each key's
        images on a step slider. Encoded and sent off the training thread."""
        import functools

        log = functools.partial(self.client.log_image, key=key, step=step, synchronous=True)
        self._send(log, self.run_id, image)

    def _send(self, fn: Callable[..., Any], *args: Any) -> None:
        """`fn(*args)` on the sender thread, in order with everything sent before."""
        from concurrent.futures import ThreadPoolExecutor

        self._sender = self._sender or ThreadPoolExecutor(1, thread_name_prefix="cnnops-mlflow")
        self._pending.append(self._sender.submit(self._call, fn, *args))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags_ = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(self.client.log_batch, self.run_id, [], [], tags_)

    def flush(self) -> None:
        """Wait until every metric batch handed to the sender thread was sent (or kept)."""
        for sent in self._pending:
            sent.result()
        self._pending.clear()

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
        self._stop_system_monitor()
        try:
            while self._backlog:  # what the server missed, in the order it happened
                fn, args = self._backlog[0]
                fn(*args)
                self._backlog.pop(0)
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            raise TrackingError(
                f"{uri_source(self.cfg)}: MLflow run {self.run_id} is incomplete: the server "
                f"went away ({first_line(e)}); the stage's outputs are kept, rerun it when the "
                "server is back"
            ) from None
        self.down = None

    def _stop_system_monitor(self) -> None:
        monitor, self._system = self._system, None
        if monitor is None:
            return
        if self.down is None:
            monitor.finish()  # its last samples go out before the run ends
        else:  # its last send would wait out the HTTP retries: let it go with the process
            import threading

            threading.Thread(target=monitor.finish, daemon=True).start()


def _system_monitor(cfg: Mlflow, run_id: str, resume: bool) -> Any:
    """MLflow's system metrics monitor on `run_id` (`system/cpu_utilization_percentage`, GPU
    ones where nvidia-ml-py is installed), sampling every second so a short run still has a
    curve; None when MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
        return None
    # The monitor `mlflow.start_run(log_system_metrics=True)` starts; our runs are the client's,
    # so it is started here. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides the second.
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its start and stop are INFO lines, four per run: a study would print pages of them.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=1, resume_logging=resume, tracking_uri=tracking_uri(cfg)
    )
    monitor.start()
    return monitor


def end_run(cfg: Mlflow, run_id: str, status: str, tags: dict[str, str]) -> None:
    """Tag and terminate a run left RUNNING by a process that died (if this store holds it)."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    try:
        if c.get_run(run_id).info.status != "RUNNING":
            return
    except MlflowException:
        return  # not in this store
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


def update_metrics(
    cfg: Mlflow, run_id: str, metrics: dict[str, float], step: int = 0
) -> list[str] | None:
    """Log to the existing run `run_id` each metric whose latest value differs, its status left
    as it is; the names logged, or None when the store does not hold the run. A missing SQLite
    file is not created: a report that reads the store must not make one."""
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    c = client(cfg)
    try:
        latest = c.get_run(run_id).data.metrics
    except MlflowException:
        return None
    changed = {k: float(v) for k, v in metrics.items() if latest.get(k) != float(v)}
    now = int(time.time() * 1000)
    if changed:
        c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in changed.items()])
    return sorted(changed)


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
