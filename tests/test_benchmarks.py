"""The benchmarks' own set-up: they run on a GPU machine, where a set-up error costs the run."""

from __future__ import annotations

from pathlib import Path

from cnnops.config import load_config


def test_the_end_to_end_benchmark_runs_the_mnist_params_in_a_folder_of_its_own(
    tmp_path: Path,
) -> None:
    from benchmarks.train_speed import e2e_project

    sets = e2e_project(tmp_path, str(tmp_path / "mirror"), ["train.max_epochs=5"])
    assert sets[::2] == ["--set"] * (len(sets) // 2)
    # What `cnnops train --set ...` loads there: paths the project check accepts.
    config = load_config(tmp_path / "params.yaml", sets[1::2])
    assert config.fetch.source == "mnist"
    assert config.fetch.mirror == str(tmp_path / "mirror")
    assert config.train.max_epochs == 5
