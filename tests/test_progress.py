"""Progress bars: drawn on a terminal's stderr, absent from a log. Real CLI runs, one with its
stderr a pseudo-terminal, fetching an image archive over loopback HTTP and preparing it."""

from __future__ import annotations

import fcntl
import functools
import http.server
import os
import struct
import subprocess
import sys
import termios
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, cnnops, set_args


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def archive_url(tmp_path: Path) -> Iterator[str]:
    """An image folder (digits on colours, 60 images) zipped and served on loopback HTTP."""
    from cnnops.data.demo import colour_digits

    root = colour_digits(tmp_path / "served" / "digits", 60, side=24)
    with zipfile.ZipFile(tmp_path / "served" / "images.zip", "w") as z:
        for path in sorted(root.rglob("*.*")):
            z.write(path, path.relative_to(root).as_posix())
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/images.zip"
    finally:
        server.shutdown()
        server.server_close()


def stage_args(url: str) -> list[str]:
    return set_args("fetch.source=imagefolder", f"fetch.url={url}", "prepare.image_size=16")


def in_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `args` with stdout and stderr a pseudo-terminal of 100 columns; its exit status and
    everything it wrote there."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return process.wait(timeout=120), out.decode(errors="replace")


def test_a_cli_run_writes_no_bar_where_stderr_is_not_a_terminal(
    workdir: Path, archive_url: str
) -> None:
    for stage in ("fetch", "prepare"):
        result = cnnops(stage, *stage_args(archive_url), cwd=workdir, check=True)
        for trace in ("\r", "%|", "it/s", "img/s", "B/s"):
            assert trace not in result.stderr, (stage, result.stderr)


def test_a_terminal_shows_the_download_and_the_prepare_bars(
    workdir: Path, archive_url: str
) -> None:
    status, fetched = in_terminal([str(BIN / "cnnops"), "fetch", *stage_args(archive_url)], workdir)
    assert status == 0, fetched
    assert "images.zip: 100%|" in fetched and "B/s]" in fetched and "\r" in fetched
    status, prepared = in_terminal(
        [str(BIN / "cnnops"), "prepare", *stage_args(archive_url)], workdir
    )
    assert status == 0, prepared
    assert "prepare: 100%|" in prepared and "write train_x: 100%|" in prepared


def test_the_trial_bar_follows_stderr_whatever_stdout_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnops.tune_stage import Progress

    master, slave = os.openpty()
    with open(slave, "w") as terminal, open(os.devnull, "w") as log:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "stderr", log)
        assert Progress(3, "val_acc").bar.disable
        monkeypatch.setattr(sys, "stdout", log)
        monkeypatch.setattr(sys, "stderr", terminal)
        bar = Progress(3, "val_acc").bar
        assert not bar.disable
        bar.close()
    os.close(master)
