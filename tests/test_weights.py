"""`cnnops weights`: torchvision's ImageNet weight files, fetched from a mirror and verified."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from cnnops.weights import NAMES, fetch_weights, hash_prefix, weights_url
from tests.conftest import MOBILENET_SHA256, cnnops

FILE = "mobilenet_v2-b0353104.pth"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's single error line: exit status 2, no traceback, nothing on stdout."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cnnops weights: error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def mirror(tmp_path: Path, mobilenet_weights: Path) -> Path:
    """A mirror folder holding a copy of torchvision's mobilenet_v2 file under its own name."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copyfile(mobilenet_weights, folder / FILE)
    return folder


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


def test_every_name_has_a_verifiable_torchvision_file() -> None:
    for name in NAMES:
        file_name = weights_url(name).rsplit("/", 1)[-1]
        assert file_name.startswith(name.split("_")[0]) and file_name.endswith(".pth")
        assert len(hash_prefix(file_name)) >= 8
    assert weights_url("mobilenet_v2").endswith("/" + FILE)
    assert MOBILENET_SHA256.startswith(hash_prefix(FILE))


def test_fetches_from_a_mirror_prints_the_params_lines_then_does_nothing(
    mirror: Path, project: Path
) -> None:
    result = cnnops("weights", "mobilenet_v2", "--mirror", str(mirror), cwd=project, check=True)
    target = project / "weights" / FILE
    assert sha256(target) == MOBILENET_SHA256
    assert sorted(p.name for p in target.parent.iterdir()) == [FILE]  # no temporary file left
    lines = result.stdout.splitlines()
    assert f"sha256: {MOBILENET_SHA256}" in lines
    assert f"  weights: weights/{FILE}" in lines
    assert f"  weights_sha256: {MOBILENET_SHA256}" in lines
    assert f"dvc add weights/{FILE}" in result.stdout

    before = target.stat()
    # The second run reads nothing: its mirror does not even hold the file.
    empty = mirror.parent / "empty"
    empty.mkdir()
    again = cnnops("weights", "mobilenet_v2", "--mirror", str(empty), cwd=project, check=True)
    assert "already there" in again.stdout
    assert f"sha256: {MOBILENET_SHA256}" in again.stdout
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in target.parent.iterdir()) == [FILE]


def test_file_url_mirror_and_dir_option(mirror: Path, project: Path) -> None:
    result = cnnops(
        "weights", "mobilenet_v2", "--mirror", mirror.as_uri(), "--dir", "pretrained", cwd=project
    )
    assert result.returncode == 0, result.stderr
    assert sha256(project / "pretrained" / FILE) == MOBILENET_SHA256
    assert f"  weights: pretrained/{FILE}" in result.stdout.splitlines()
    assert not (project / "weights").exists()


def test_corrupted_mirror_file_is_refused_and_leaves_nothing(mirror: Path, project: Path) -> None:
    data = bytearray((mirror / FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mirror / FILE).write_bytes(bytes(data))
    line = one_error_line(cnnops("weights", "mobilenet_v2", "--mirror", str(mirror), cwd=project))
    assert "checksum mismatch" in line and "b0353104" in line
    assert list(project.iterdir()) == []  # not even the weights/ folder it made


def test_missing_mirror_file_is_one_line(tmp_path: Path, project: Path) -> None:
    line = one_error_line(cnnops("weights", "mobilenet_v2", "--mirror", str(tmp_path), cwd=project))
    assert f"{FILE} not found" in line
    assert list(project.iterdir()) == []


def test_unknown_name_lists_the_allowed_ones(project: Path) -> None:
    line = one_error_line(cnnops("weights", "resnet152", cwd=project))
    assert "'resnet152'" in line
    for name in NAMES:
        assert name in line
    assert not (project / "weights").exists()


def test_an_existing_different_file_is_never_overwritten(mirror: Path, project: Path) -> None:
    target = project / "weights" / FILE
    target.parent.mkdir()
    target.write_bytes(b"someone else's file")
    line = one_error_line(cnnops("weights", "mobilenet_v2", "--mirror", str(mirror), cwd=project))
    assert f"weights/{FILE}" in line and "left untouched" in line
    assert target.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in target.parent.iterdir()) == [FILE]


def test_fetched_file_loads_into_torchvision_mobilenet_v2(mirror: Path, project: Path) -> None:
    import torch
    import torchvision

    got = fetch_weights("mobilenet_v2", project / "weights", str(mirror))
    assert got.sha256 == MOBILENET_SHA256 and got.source == str(mirror / FILE)
    model = torchvision.models.mobilenet_v2()
    state = torch.load(got.path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    assert model.classifier[-1].out_features == 1000
    again = fetch_weights("mobilenet_v2", project / "weights", str(mirror))
    assert again.source is None and again.sha256 == MOBILENET_SHA256
