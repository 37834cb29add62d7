"""Paths cannot destroy data: `paths.*` stay inside the project and apart, and a stage replaces
only a folder it created itself (the `.cnnops` marker), building the new one beside it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnops.cli import app
from cnnops.config import load_config
from cnnops.errors import ConfigError, DataError
from cnnops.runs import MARKER, atomic_dir, check_replaceable
from tests.conftest import ROOT, cnnops


def in_process(command: str, *overrides: str) -> tuple[int, str]:
    """`cnnops COMMAND --set ...` run in this process: its exit status and its stderr."""
    result = CliRunner().invoke(app, [command, *(a for o in overrides for a in ("--set", o))])
    return result.exit_code, result.stderr


def show_config(*overrides: str) -> tuple[int, str]:
    return in_process("show-config", *overrides)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- paths.* values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "culprit", "why"),
    [
        ("paths.prepared=", "paths.prepared = None", "empty"),
        ("paths.prepared=''", "paths.prepared = ''", "empty"),
        ("paths.prepared=.", "paths.prepared = '.'", "the project folder itself"),
        ("paths.reports=data/..", "paths.reports = 'data/..'", "'..' is not allowed"),
        ("paths.raw=/tmp/cnnops-raw", "paths.raw = '/tmp/cnnops-raw'", "an absolute path"),
        ("paths.models=../models", "paths.models = '../models'", "'..' is not allowed"),
        ("paths.raw=data", "paths.raw = 'data' contains paths.prepared", "must not overlap"),
        ("paths.prepared=data/raw", "paths.prepared = 'data/raw' is the same folder", "overlap"),
        ("paths.models=reports/m", "paths.models = 'reports/m' lies inside paths.reports", ""),
        ("paths.raw=.git", "paths.raw = '.git': overlaps .git", "must not overlap"),
        ("paths.raw=.git/objects", "paths.raw = '.git/objects': overlaps .git", ""),
        ("paths.reports=.dvc", "paths.reports = '.dvc': overlaps .dvc", ""),
        ("paths.models=src", "paths.models = 'src': overlaps paths.src", ""),
        ("paths.models=src/cnnops/models", "overlaps paths.src", ""),
        ("paths.src=../elsewhere", "paths.src = '../elsewhere': outside the project", ""),
        ("paths.src=/opt/cnnops", "paths.src = '/opt/cnnops': an absolute path", ""),
    ],
)
def test_a_bad_path_exits_2_with_one_line_naming_key_and_set(
    workdir: Path, override: str, culprit: str, why: str
) -> None:
    status, stderr = show_config(override)
    assert status == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"error: --set {override}: " in stderr  # blames the --set, not params.yaml
    assert culprit in stderr and why in stderr


def test_the_overlap_error_names_the_key_that_was_set(workdir: Path) -> None:
    # paths.raw sorts first, but the user changed paths.reports: that is the line to read.
    status, stderr = show_config("paths.reports=data/raw/r")
    assert status == 2
    assert stderr.startswith("cnnops show-config: error: --set paths.reports=data/raw/r: ")
    assert "paths.reports = 'data/raw/r' lies inside paths.raw = 'data/raw'" in stderr


def test_a_path_error_from_the_params_file_names_the_file(workdir: Path) -> None:
    params = workdir / "params.yaml"
    params.write_text(params.read_text().replace("prepared: data/prepared", "prepared: /srv/p"))
    result = cnnops("show-config")  # the installed command, as a user runs it
    assert result.returncode == 2
    assert result.stderr.startswith(
        "cnnops show-config: error: params.yaml: paths.prepared = '/srv/p': an absolute path"
    )
    assert result.stderr.count("\n") == 1


def test_a_symbolic_link_out_of_the_project_is_refused(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (workdir / "data").symlink_to(elsewhere, target_is_directory=True)
    status, stderr = show_config()
    assert status == 2
    assert "params.yaml: paths.raw = 'data/raw': a symbolic link leads outside" in stderr


def test_paths_are_judged_from_the_params_files_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("paths: {src: ../shared/cnnops}\n")
    with pytest.raises(ConfigError, match=r"paths.src = '../shared/cnnops': outside the project"):
        load_config(project / "params.yaml")
    (tmp_path / "shared" / "cnnops").mkdir(parents=True)  # a source tree shared by pipelines
    assert load_config(project / "params.yaml").paths.src == Path("../shared/cnnops")
    # The shipped MNIST pipeline reads the package two levels up: allowed, as it exists.
    assert load_config(ROOT / "pipelines" / "mnist" / "params.yaml").paths.raw == Path("data/raw")


# --- a stage replaces only what it created -----------------------------------------------------


@pytest.fixture
def fetched(workdir: Path) -> Path:
    assert in_process("fetch") == (0, "")
    return workdir


def test_prepare_never_deletes_a_folder_it_did_not_create(fetched: Path) -> None:
    mine = fetched / "data" / "prepared"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "plan.txt").write_text("my own notes\n")
    before = snapshot(fetched)
    result = cnnops("prepare")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "data/prepared: holds files but no .cnnops marker" in result.stderr
    assert "will not delete a folder it did not create" in result.stderr
    assert snapshot(fetched) == before  # nothing written, nothing deleted, no scratch left
    assert sorted(p.name for p in (fetched / "data").iterdir()) == ["prepared", "raw"]


def test_a_users_file_inside_a_cnnops_folder_survives(fetched: Path) -> None:
    assert in_process("prepare")[0] == 0
    note = fetched / "data" / "prepared" / "notes.txt"
    note.write_text("keep me\n")
    before = snapshot(fetched)
    status, stderr = in_process("prepare", "prepare.seed=7")
    assert status == 2 and stderr.count("\n") == 1
    assert "data/prepared/notes.txt: not written by cnnops prepare" in stderr
    assert snapshot(fetched) == before


def test_a_folder_cnnops_created_is_replaced_and_nothing_else_is_touched(fetched: Path) -> None:
    (fetched / "data" / "keep.txt").write_text("beside the outputs\n")
    assert in_process("prepare")[0] == 0
    prepared = fetched / "data" / "prepared"
    marker = (prepared / MARKER).read_text().splitlines()
    assert marker[0].startswith("created by cnnops prepare;")
    assert marker[1:] == sorted(p.name for p in prepared.iterdir() if p.name != MARKER)
    first = snapshot(prepared)

    def others() -> dict[str, str]:  # all but prepare's outputs: data/prepared, data.json
        outputs = ("data/prepared/", "reports/data.json")
        return {k: v for k, v in snapshot(fetched).items() if not k.startswith(outputs)}

    untouched = others()
    assert in_process("prepare", "prepare.seed=7")[0] == 0
    second = snapshot(prepared)
    assert second.keys() == first.keys() and second["train_y.npy"] != first["train_y.npy"]
    assert others() == untouched  # data/raw, data/keep.txt, params.yaml
    assert sorted(p.name for p in (fetched / "data").iterdir()) == ["keep.txt", "prepared", "raw"]
    assert (fetched / "data" / "raw" / MARKER).read_text().startswith("created by cnnops fetch;")


def test_a_stage_does_not_replace_another_stages_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "fetch") as scratch:
        (scratch / "a.bin").write_bytes(b"a")
    before = snapshot(target)
    assert set(before) == {"a.bin", MARKER}
    with pytest.raises(DataError, match=r"out: created by cnnops fetch, not by cnnops prepare"):
        check_replaceable(target, "prepare")
    with pytest.raises(DataError), atomic_dir(target, "prepare"):
        pytest.fail("the block must not run")
    assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_replaced_but_a_file_or_link_is_not(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", "fetch") as scratch:
        (scratch / "x").write_text("x")
    assert (tmp_path / "empty" / "x").read_text() == "x"
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    for name, kind in (("file", "a file"), ("link", "a symbolic link")):
        with pytest.raises(DataError, match=f"{name}: {kind}, not a folder cnnops fetch created"):
            check_replaceable(tmp_path / name, "fetch")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_failed_or_killed_build_leaves_the_old_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "fetch") as scratch:
        (scratch / "old.bin").write_bytes(b"old")
    before = snapshot(target)
    with pytest.raises(RuntimeError), atomic_dir(target, "fetch") as scratch:
        (scratch / "new.bin").write_bytes(b"half")
        raise RuntimeError("the download broke")
    assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A process killed while writing: no cleanup runs, yet the target is the old one, whole.
    code = (
        "import os, sys; from pathlib import Path; from cnnops.runs import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1]), 'fetch') as s:\n"
        "    (s / 'new.bin').write_bytes(b'half'); os._exit(9)\n"
    )
    died = subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert died.returncode == 9
    assert snapshot(target) == before
