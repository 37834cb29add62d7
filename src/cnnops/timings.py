"""Where a command's seconds go, phase by phase (`benchmarks/startup.py` prints them).

With CNNOPS_TIMINGS=<file> in the environment, every `phase(name)` block records when it began
and ended (wall-clock, so the benchmark can line them up with the moment it started the process),
and the records are written to <file> as JSON when the process exits. Without it a phase costs
one environment lookup.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from collections.abc import Iterator

_records: list[dict[str, float | str]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    if "CNNOPS_TIMINGS" not in os.environ:
        yield
        return
    if not _records:
        atexit.register(_write, os.environ["CNNOPS_TIMINGS"])
    begin = time.time()
    try:
        yield
    finally:
        _records.append({"phase": name, "begin": begin, "end": time.time()})


def _write(path: str) -> None:
    with open(path, "w") as f:
        json.dump({"phases": _records, "exit": time.time()}, f)


def seconds_by_phase(path: str | os.PathLike[str], spawned: float) -> dict[str, float]:
    """A process's phases as `phase(name)` wrote them to `path`: seconds per name (a name
    entered many times adds up), with the process's start before its first phase ("python +
    cli start", from `spawned`, the time.time() it was started at) and its exit after the
    records were written ("exit"), in the order they first ended (an outer phase after
    those inside it)."""
    with open(path) as f:
        record = json.load(f)
    first = min((p["begin"] for p in record["phases"]), default=spawned)
    phases = {"python + cli start": first - spawned}
    for p in record["phases"]:
        phases[p["phase"]] = phases.get(p["phase"], 0.0) + p["end"] - p["begin"]
    phases["exit"] = max(time.time() - record["exit"], 0.0)
    return phases
