"""Shared fixtures: an isolated working folder per test, the MNIST mirror, and a tiny config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest_plugins = ["tests.browser"]  # the browser fixtures, one session-wide Playwright

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MNIST_MIRROR = Path(
    os.environ.get("CNNOPS_MNIST_MIRROR", ROOT.parent / "shared" / "data" / "mnist")
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder holding the root params.yaml, made the current directory."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def digits(workdir: Path) -> Path:
    """A working folder with the embedded digits fetched and prepared."""
    cnnops("fetch", cwd=workdir, check=True)
    cnnops("prepare", cwd=workdir, check=True)
    return workdir


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    if not (MNIST_MIRROR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the MNIST mirror is not at {MNIST_MIRROR}")
    return MNIST_MIRROR


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database on the local PostgreSQL server; yields its SQLAlchemy URL, drops it after."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    except psycopg2.OperationalError as e:
        if os.environ.get("CI"):  # CI starts the server: a missing one is a failure there
            raise
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {e}")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


def set_params(path: Path, overrides: list[str]) -> None:
    """Apply `--set`-style overrides to a params file in place, as `dvc exp run -S` would."""
    import io

    from ruamel.yaml import YAML

    from cnnops.config import apply_override, read_params

    data = read_params(path)
    for assignment in overrides:
        apply_override(data, assignment)
    stream = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, stream)
    path.write_text(stream.getvalue())


def sh(*args: str, cwd: Path) -> str:
    """A command's stdout then stderr; fails the test, showing both, on a non-zero exit."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


def git_dvc_project(path: Path) -> Path:
    """Make `path` a git repository with a DVC project in it, as `git init && dvc init` would,
    with a committer set and DVC's analytics off."""
    sh("git", "init", "-q", cwd=path)
    sh("git", "config", "user.email", "ci@example.com", cwd=path)
    sh("git", "config", "user.name", "ci", cwd=path)
    sh("dvc", "init", "-q", cwd=path)
    sh("dvc", "config", "core.analytics", "false", cwd=path)
    return path


def set_args(*overrides: str) -> list[str]:
    """`--set` options for a command line, one per `key=value` override."""
    return [arg for o in overrides for arg in ("--set", o)]


def cnnops(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `cnnops` console script as a user would."""
    result = subprocess.run([str(BIN / "cnnops"), *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"cnnops {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
"""torchvision's mobilenet_v2-b0353104.pth (ImageNet), which `make install` puts in .cache/weights."""


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 weight file, as `make install` leaves it."""
    path = ROOT / ".cache" / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        if os.environ.get("CI"):  # CI runs `make install`: a missing file is a failure there
            pytest.fail(f"{path} is missing: run make install")
        pytest.skip(f"{path} is missing: run make install to fetch it")
    return path
