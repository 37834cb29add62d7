"""What keeps a stage's outputs whole: one writer per output folder, a staging folder that
replaces the outputs only when the run finishes, atomic file writes, and signals that stop a
run at a safe point instead of killing it mid-write.

    with exclusive(models / "train", "cnnops train"):       # a second writer exits 2
        staging = Staging(models / "train", "train", key)   # works in models/train.partial
        ...train into staging.work, resumable after a kill...
        staging.commit()                                     # renames, not interruptible

Signals. Inside `interruptible()`, SIGTERM and SIGINT raise `Interrupted` (exit 128 + signal
number) at once, except where code has said a raise would be unsafe (`deferred_signals()`):
there the signal waits until the block ends. Training defers them for its whole loop and polls
`pending_signal()` between batches, so it stops at a batch boundary with its last checkpoint
whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from cnnops.errors import CnnopsError, DataError


class BusyError(CnnopsError):
    """Another process holds the output folder's lock."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """SIGTERM or SIGINT arrived; the command exits 128 + `signum`."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def rank_zero() -> bool:
    """True in the process that owns outputs: the only one, or rank 0 of a DDP launch."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


# --- one writer per output folder -------------------------------------------------------------


@contextlib.contextmanager
def exclusive(folder: Path, command: str) -> Iterator[None]:
    """Hold `<folder>.lock` while the block runs; a second holder gets BusyError naming the PID.

    The lock is an flock: the kernel drops it when the process dies, so a killed run never
    leaves a stale lock behind."""
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(
                f"{folder}: in use by another {command} (PID {holder}); wait for it to end "
                "or stop it, then rerun"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# --- files and folders written whole ----------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or not whole."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- folders a stage may replace ---------------------------------------------------------------

MARKER = ".cnnops"
"""Written into every folder `atomic_dir` creates: its first line names the stage, the lines
after it the files the stage wrote. A later run replaces the folder only while it holds no
other file, so a stage only ever deletes what it created itself."""
_MADE_BY = re.compile(r"created by cnnops (\S+?);")


def _files(folder: Path) -> list[str]:
    """Every file (and symbolic link) under `folder`, as sorted POSIX paths relative to it."""
    found = []
    for parent, dirs, names in os.walk(folder):
        here = Path(parent)
        links = [d for d in dirs if (here / d).is_symlink()]  # listed, never walked into
        found += [(here / n).relative_to(folder).as_posix() for n in [*names, *links]]
    return sorted(found)


def mark(folder: Path, stage: str) -> None:
    """Write `folder`'s marker: made by `stage`, holding the files it holds now."""
    listing = "".join(f"{name}\n" for name in _files(folder) if name != MARKER)
    (folder / MARKER).write_text(
        f"created by cnnops {stage}; cnnops replaces this folder\n{listing}"
    )


def made_by(folder: Path) -> str | None:
    """The stage whose marker `folder` carries, if any."""
    try:
        first = (folder / MARKER).read_text(errors="replace").split("\n", 1)[0]
    except OSError:
        return None
    found = _MADE_BY.match(first)
    return found.group(1) if found else None


def check_replaceable(target: Path, stage: str) -> None:
    """Raise DataError, deleting nothing, unless `stage` may replace `target`: it is missing,
    an empty folder, or a folder whose marker says `stage` made it and lists all its files."""
    if not os.path.lexists(target):
        return
    refuse = "cnnops will not delete a folder it did not create; remove or move it yourself"
    if target.is_symlink() or not target.is_dir():
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise DataError(f"{target}: {kind}, not a folder cnnops {stage} created; {refuse}")
    if not any(target.iterdir()):
        return
    marker = target / MARKER
    if marker.is_symlink() or not marker.is_file():
        raise DataError(
            f"{target}: holds files but no {MARKER} marker, so cnnops did not create it (or a "
            f"cnnops older than the marker did); {refuse}, then rerun"
        )
    first, *listed = marker.read_text(errors="replace").splitlines() or [""]
    made_by = _MADE_BY.match(first)
    if not made_by or made_by.group(1) != stage:
        maker = f"cnnops {made_by.group(1)}" if made_by else "an unknown writer"
        raise DataError(
            f"{target}: created by {maker}, not by cnnops {stage}, which replaces only its own "
            f"folders; {refuse}, or point paths.* elsewhere"
        )
    extra = sorted(set(_files(target)) - {MARKER, *listed})
    if extra:
        raise DataError(
            f"{target / extra[0]}: not written by cnnops {stage} ({len(extra)} such file(s) in "
            f"{target}); cnnops will not delete files it did not create: move them out, then rerun"
        )


def _sibling(target: Path, role: str) -> Path:
    """A new empty folder beside `target` (same file system, so renames stay atomic), made
    with the umask's permissions, unlike mkdtemp's owner-only ones."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{role}-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: no free name for a {role} folder")


@contextlib.contextmanager
def atomic_dir(target: Path, stage: str) -> Iterator[Path]:
    """Yield a scratch folder beside `target` that replaces it only if the block succeeds.

    `check_replaceable` decides, before the block runs and again before the swap, whether
    `target` may go. The new folder gets its marker, then two renames swap it in (the old one
    moved aside first), so a crash leaves the old folder, or none, never a half-written one."""
    check_replaceable(target, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = _sibling(target, "new")
    try:
        yield scratch
        swap_in(scratch, target, stage)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def swap_in(new: Path, target: Path, stage: str) -> None:
    """Mark `new` as `stage`'s, listing its files, and put it in `target`'s place: the old
    folder (which `stage` must have made) moves aside, `new` moves in, the old one goes. No
    signal interrupts the renames."""
    with deferred_signals():
        mark(new, stage)
        check_replaceable(target, stage)  # the folder may have changed since it was checked
        if not os.path.lexists(target):
            os.replace(new, target)
            return
        old = _sibling(target, "old")
        os.replace(target, old)  # onto the empty folder just made: one rename
        try:
            os.replace(new, target)
        except OSError:
            os.replace(old, target)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)


def fingerprint(config_text: str, inputs: list[Path]) -> str:
    """What a run's result depends on: the resolved config and its input files (name, size,
    modification time). A resumed run must match the one that was interrupted."""
    digest = hashlib.sha256(config_text.encode())
    for root in inputs:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            st = p.stat()
            digest.update(f"{p.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Staging:
    """A run writes into `<out>.partial`; `commit()` swaps it in for `out` when it finished.

    `state` (state.json in the staging folder) says what run is in progress there: its
    fingerprint, MLflow run id, and anything else the stage records. A staging folder of a
    run with another fingerprint is stale and cleared; one with the same fingerprint resumes.
    """

    STATE = "state.json"

    def __init__(self, out: Path, stage: str, fingerprint: str) -> None:
        self.out, self.stage, self.fingerprint = out, stage, fingerprint
        self.work = out.with_name(out.name + ".partial")
        check_replaceable(out, stage)  # before any work: a folder we may not replace stops us
        found = read_json(self.work / self.STATE)
        self.previous: dict[str, Any] | None = found
        self.resumable = found is not None and found.get("fingerprint") == fingerprint
        if os.path.lexists(self.work) and not self.resumable:
            # An interrupted run of other settings: its own folder, and nothing else, goes.
            if made_by(self.work) != stage:
                check_replaceable(self.work, stage)  # refuses, naming the folder
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        mark(self.work, stage)
        self.state: dict[str, Any] = found if self.resumable and found else {}
        self.update(fingerprint=fingerprint)

    def update(self, **values: Any) -> None:
        self.state.update(values)
        write_bytes(self.work / self.STATE, json.dumps(self.state, indent=2).encode())

    def commit(self) -> None:
        """Replace `out` by the finished run (`swap_in`: renames, not interruptible)."""
        with deferred_signals():
            (self.work / self.STATE).unlink()
            swap_in(self.work, self.out, self.stage)


# --- signals ------------------------------------------------------------------------------------

_pending: list[int] = []
_defer_depth = 0


def _handler(signum: int, frame: FrameType | None) -> None:
    if _defer_depth > 0:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def pending_signal() -> int | None:
    return _pending[0] if _pending else None


def clear_pending() -> None:
    _pending.clear()


def raise_pending() -> None:
    if _pending:
        raise Interrupted(_pending[0])


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` inside this block (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending.clear()


@contextlib.contextmanager
def deferred_signals(raise_after: bool = True) -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block ends (then raise, unless `raise_after` is False and
    the caller polls `pending_signal()` itself). Nests."""
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if raise_after and _defer_depth == 0:
        raise_pending()


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent process dies (say `dvc repro`, killed), so a
    stage never trains on as an orphan. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)


def exit_now(status: int) -> None:
    """End the process with `status` at once, after logging and the standard streams are
    flushed: no waiting on Python's teardown of torch, Lightning or MLflow. For a process whose
    work, exit handlers and threads are done."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a closed pipe
            stream.flush()
    os._exit(status)
