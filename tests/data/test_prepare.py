"""The prepare stage: seeded, stratified, compact splits with their statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
