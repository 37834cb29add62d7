"""Where Optuna studies live: storage, a study-wide lock, and recovery of dead workers' trials.

Two storages. The embedded default is Optuna's journal file: appends under a lock file, safe
for several processes on one machine. Team mode is an RDB URL (PostgreSQL): workers on many
machines share the study, and Optuna's heartbeat fails trials of workers that went silent.

The journal storage has no heartbeat (Optuna 5 implements `BaseHeartbeat` for RDB only), so
each trial records its owner as host:pid:start-time; a RUNNING trial whose owner process is
gone from this host is failed and re-enqueued by the same retry callback the heartbeat uses.
The start time guards against a recycled pid. This check runs on RDB too, so a worker killed
on this machine is recovered at once instead of after the heartbeat grace period.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops.errors import CnnopsError
from cnnops.team import driver_url

if TYPE_CHECKING:
    import optuna

    from cnnops.config import Config

OWNER_KEY = "cnnops.worker"
HEARTBEAT_S = 10
GRACE_S = 30
MAX_RETRY = 3


def storage_url(config: Config) -> str:
    return config.tune.storage or str(config.paths.models / "optuna" / "studies.journal")


def is_rdb(url: str) -> bool:
    return "://" in url


def storage_exists(url: str) -> bool:
    """Whether there is a study storage at `url` to read (a server is taken to be there):
    opening a SQLite URL or a journal path that is not would create it."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).is_file()
    return is_rdb(url) or Path(url).is_file()


def data_hash(prepared: Path) -> str:
    """Hash of the prepared split files, so a new split starts a new study."""
    digest = hashlib.sha256()
    # The ownership marker says who wrote the folder, not what is in it.
    for path in sorted(p for p in prepared.rglob("*") if p.is_file() and p.name != ".cnnops"):
        digest.update(path.relative_to(prepared).as_posix().encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def study_name(config: Config, prepared: Path) -> str:
    """`tune.study_name`, or one derived from the space, the fixed settings and the data."""
    if config.tune.study_name:
        return config.tune.study_name
    # Everything a trial's value depends on; n_trials, workers and storage are not in it, so
    # asking for more trials (or more workers) continues the same study.
    dumped = config.model_dump(mode="json")
    fixed = {k: dumped[k] for k in ("model", "train", "augment") if k in dumped}
    key = {
        "space": config.tune.space.model_dump(mode="json"),
        "metric": config.tune.metric,
        "fixed": fixed,
        "data": data_hash(prepared),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"cnnops-{config.fetch.source}-{digest}"


@contextmanager
def unreachable_storage(url: str) -> Iterator[None]:
    """A database that refuses the connection (down, wrong password, no such database) is one
    line naming the storage, its password masked, and the server's reason."""
    import sqlalchemy.exc

    from cnnops.team import mask

    try:
        yield
    except sqlalchemy.exc.OperationalError as e:
        lines = [line.strip() for line in str(e.orig or e).splitlines() if line.strip()]
        reason = lines[0] if lines else type(e).__name__
        raise CnnopsError(
            f"tune.storage = {mask(url)!r}: cannot connect: {mask(reason)}; a password comes "
            "from PGPASSWORD or a pgpass file"
        ) from None


def open_storage(url: str, on_stale: Callable[[Any, Any], None]) -> optuna.storages.BaseStorage:
    """The journal file at `url`, or an RDB storage with heartbeats when `url` is a URL."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if is_rdb(url):
        with unreachable_storage(url):
            return RDBStorage(
                driver_url(url),
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=on_stale,
            )
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    # The open-lock (O_EXCL lock file) works on any local or NFSv3+ file system.
    return JournalStorage(JournalFileBackend(url, lock_obj=JournalFileOpenLock(url)))


@contextmanager
def study_lock(url: str, name: str, lock_dir: Path) -> Iterator[None]:
    """Serialize "count trials, then start one" across workers, so none overshoots n_trials.

    A kernel lock (flock, or a PostgreSQL session advisory lock) dies with its holder: a
    SIGKILLed worker never leaves it taken.
    """
    if url.startswith("postgresql"):
        with _advisory_lock(url, name):
            yield
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{name}.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_engines: dict[str, Any] = {}


@contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[None]:
    import sqlalchemy

    engine = _engines.get(url) or _engines.setdefault(
        url, sqlalchemy.create_engine(driver_url(url))
    )
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with unreachable_storage(url), engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def owner() -> str:
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _owner_is_dead(tag: str) -> bool:
    import psutil

    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return False  # another machine's worker: the RDB heartbeat watches it
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True


def recover(study: optuna.Study, on_stale: Callable[[Any, Any], None]) -> int:
    """Fail RUNNING trials of dead workers and re-enqueue them; return how many."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # RDB heartbeat; a no-op for the journal
    found = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = trial.user_attrs.get(OWNER_KEY)
        if not tag or not _owner_is_dead(tag):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished or failed by another worker meanwhile
        on_stale(study, study._storage.get_trial(trial._trial_id))
        found += 1
    return found
