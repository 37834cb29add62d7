"""dvc.yaml's code deps: the train and tune stages rerun when the code they train with changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT

SRC = ROOT / "src"
# Code whose changes do not change what a stage trains: configuration (its values are params
# deps), errors, recording (MLflow, reports), and the fetch/prepare stages' own code (their
# output is the dep).
NOT_TRAINING = {
    "cnnops",
    "cnnops.config",
    "cnnops.errors",
    "cnnops.reports",
    "cnnops.tracking",
    "cnnops.data",
    "cnnops.data.prepare",
    "cnnops.data.sources",
    "cnnops.data.images",
    "cnnops.team",  # masks passwords in messages: nothing a model depends on
    "cnnops.progress",  # progress bars on a terminal
    "cnnops.epoch_images",  # per-epoch pictures for MLflow, drawn in eval mode without grad
    "cnnops.tracker_process",  # MLflow calls, from a process of their own
    "cnnops.timings",  # how long each phase of a command took
}


def source(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(module: str) -> set[str]:
    """The cnnops modules `module` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("cnnops") and source(m).is_file()}


def closure(entry: str) -> set[str]:
    seen, todo = set(), [entry]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported(module))
    return seen


@pytest.mark.parametrize("stage, entry", [("train", "cnnops.train"), ("tune", "cnnops.tune_stage")])
def test_a_training_stage_depends_on_all_the_code_it_trains_with(stage: str, entry: str) -> None:
    dvc = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    deps = [
        SRC / "cnnops" / d.removeprefix("${paths.src}/")
        for d in dvc["stages"][stage]["deps"]
        if d.startswith("${paths.src}/")
    ]
    files = {source(m) for m in closure(entry) - NOT_TRAINING}
    missing = sorted(
        str(f.relative_to(SRC)) for f in files if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage} lacks code deps: {missing}"
