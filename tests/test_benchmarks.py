"""The benchmarks' own set-up: they run on a GPU machine, where a set-up error costs the run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

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


def test_the_gpu_is_busy_for_the_union_of_its_kernels_spans_not_their_sum() -> None:
    from benchmarks.trials_at_once import gpu_time

    def kernel(start: int, end: int) -> SimpleNamespace:  # microseconds, as the profiler's
        return SimpleNamespace(
            time_range=SimpleNamespace(start=start, end=end), device_time=end - start
        )

    # Two streams overlapping on [10, 30) and [20, 50), one inside the first, then a gap.
    kernels = [kernel(20, 50), kernel(10, 30), kernel(12, 18), kernel(100, 110)]
    busy, summed = gpu_time(kernels)
    assert busy == pytest.approx(50e-6)  # [10, 50) and [100, 110)
    assert summed == pytest.approx(66e-6)
