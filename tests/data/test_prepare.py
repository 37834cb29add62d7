"""The prepare stage: seeded, stratified, compact splits with their statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnops.config import Config, Prepare
from cnnops.data import prepare
from cnnops.data.sources import fetch


def test_stratified_split_keeps_class_ratios_and_covers_every_index() -> None:
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, val, test = prepare.stratified_split(y, [0.1, 0.2], seed=1)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(200))
    assert np.bincount(y[val]).tolist() == [10, 5, 3, 2]
    assert np.bincount(y[test]).tolist() == [20, 10, 6, 4]


def test_split_is_a_function_of_the_seed() -> None:
    y = np.repeat(np.arange(3), 30)
    a = prepare.stratified_split(y, [0.2], seed=7)
    b = prepare.stratified_split(y, [0.2], seed=7)
    c = prepare.stratified_split(y, [0.2], seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_prepare_writes_uint8_splits_stats_and_report(tmp_path: Path) -> None:
    config = Config(prepare=Prepare(image_size=12))
    fetch(config.fetch, tmp_path / "raw")
    stats = prepare.prepare(config, tmp_path / "raw", tmp_path / "prepared", tmp_path / "data.json")
    loaded = prepare.load(tmp_path / "prepared")
    assert loaded.x["train"].dtype == np.uint8 and loaded.shape == (1, 12, 12)
    total = sum(stats["splits"][s]["total"] for s in prepare.SPLITS)
    assert total == 1797
    test_total = json.loads((tmp_path / "data.json").read_text())["splits"]["test"]["total"]
    assert abs(test_total - 0.2 * 1797) <= 10  # 20% of each class, rounded per class
    assert 0.2 < loaded.mean[0] < 0.4 and loaded.std[0] > 0.1


def test_mnist_keeps_the_official_test_set(tmp_path: Path, mnist_mirror: Path) -> None:
    config = Config.model_validate({"fetch": {"source": "mnist", "mirror": str(mnist_mirror)}})
    fetch(config.fetch, tmp_path / "raw")
    data = prepare.split(config, tmp_path / "raw")
    assert len(data.y["test"]) == 10000
    assert len(data.y["train"]) + len(data.y["val"]) == 60000


def test_channel_statistics_are_exact_without_a_float_copy() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(37, 3, 9, 7), dtype=np.uint8)
    mean, std = prepare.statistics(x, chunk=5)  # chunks that do not divide the count
    pixels = x.astype(np.float64) / 255.0
    assert np.allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(std, pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-9)


def make_folder_of(root: Path, per_class: int, start: int = 0, size: int = 12) -> Path:
    """Two classes of `per_class` small PNGs each, numbered from `start`; a number always
    gives the same pixels, so a later call with a higher `start` only adds images."""
    from PIL import Image

    for label, (name, shade) in enumerate((("cats", 60), ("dogs", 190))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([label, i])
            pixels = np.clip(rng.normal(shade, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def folder_config(folder: Path, **prepare_args: object) -> Config:
    return Config.model_validate(
        {
            "fetch": {"source": "imagefolder", "url": str(folder)},
            "prepare": {"image_size": 16, **prepare_args},
        }
    )


def test_an_image_folder_prepares_in_worker_processes_through_the_cache(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = make_folder_of(tmp_path / "pets", per_class=40)  # above one worker chunk (64)
    config = folder_config(folder, workers=2)
    raw, out, report = tmp_path / "raw", tmp_path / "prepared", tmp_path / "data.json"
    fetch(config.fetch, raw)
    in_memory = prepare.split(config, raw)  # the whole folder through memory, as reference
    stats = prepare.prepare(config, raw, out, report)
    assert "80 images: 80 decoded, 0 from the cache" in capfd.readouterr().err
    streamed = prepare.load(out, mmap=True)
    for name in prepare.SPLITS:
        assert np.array_equal(streamed.x[name], in_memory.x[name])
        assert np.array_equal(streamed.y[name], in_memory.y[name])
    assert np.allclose(streamed.mean, in_memory.mean) and np.allclose(streamed.std, in_memory.std)
    assert stats["skipped"] == [] and stats["splits"]["train"]["total"] == len(in_memory.y["train"])

    make_folder_of(folder, per_class=1, start=40)  # two new images; the others unchanged
    fetch(config.fetch, raw)
    prepare.prepare(config, raw, out, report)
    assert "82 images: 2 decoded, 80 from the cache" in capfd.readouterr().err


def test_the_cache_folder_must_be_prepares_own(tmp_path: Path) -> None:
    from cnnops.errors import DataError

    folder = make_folder_of(tmp_path / "pets", per_class=3)
    config = folder_config(folder)
    fetch(config.fetch, tmp_path / "raw")
    mine = tmp_path / "prepared.cache"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(DataError, match="prepared.cache: exists and was not created by cnnops"):
        prepare.prepare(config, tmp_path / "raw", tmp_path / "prepared", tmp_path / "data.json")
    assert (mine / "notes.txt").read_text() == "a user's file"
    (mine / "notes.txt").unlink()
    mine.rmdir()
    mine.write_text("a user's file where the cache goes")
    with pytest.raises(DataError, match="prepared.cache: exists and was not created by cnnops"):
        prepare.prepare(config, tmp_path / "raw", tmp_path / "prepared", tmp_path / "data.json")
    assert mine.read_text() == "a user's file where the cache goes"


@pytest.mark.slow
def test_a_preempted_prepare_leaves_nothing_partial_and_the_rerun_keeps_its_work(
    workdir: Path,
) -> None:
    import os
    import signal
    import subprocess
    import time

    from benchmarks.synthetic import make_folder

    from tests.conftest import BIN, cnnops, set_params

    folder = make_folder(workdir / "photos", 1000, side=128)
    set_params(
        workdir / "params.yaml",
        [
            "fetch.source=imagefolder",
            f"fetch.url={folder}",
            "prepare.image_size=96",
            "prepare.workers=2",
        ],
    )
    cnnops("fetch", check=True)
    proc = subprocess.Popen(
        [str(BIN / "cnnops"), "prepare"], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    cache = workdir / "data/prepared.cache"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(cache.glob("*/*.u8")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # the stage's process only, as `dvc repro` stops it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "cnnops prepare: interrupted by SIGTERM" in err
    assert not (workdir / "data/prepared").exists()
    assert [p.name for p in (workdir / "data").iterdir()] == sorted(["raw", "prepared.cache"])
    done = cnnops("prepare", check=True)
    decoded = int(done.stderr.split(" images: ")[1].split(" decoded")[0])
    assert decoded < 1000  # what the killed run decoded stayed in the cache
    assert len(np.load(workdir / "data/prepared/train_y.npy")) > 600


def test_resizing_a_chunk_at_a_time_gives_the_whole_batch_result() -> None:
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(0).integers(0, 256, (37, 3, 8, 8), dtype=np.uint8)
    t = F.interpolate(torch.from_numpy(x).float(), size=(20, 20), mode="bilinear", antialias=True)
    whole = t.round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(prepare.resize(x, 20, chunk=5), whole)
