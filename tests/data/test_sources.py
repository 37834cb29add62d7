"""Fetching: checksums on decompressed content, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnops.config import Config, Fetch, Prepare
from cnnops.data.sources import fetch, load_raw, read_idx
from cnnops.errors import DataError
from tests.conftest import cnnops


def test_embedded_digits_need_no_network(tmp_path: Path) -> None:
    fetch(Fetch(source="digits"), tmp_path / "raw")
    data = load_raw(Config(), tmp_path / "raw")
    x, y = data.train
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.uint8
    assert sorted(set(y.tolist())) == list(range(10))


def test_mnist_from_mirror_is_verified_and_readable(tmp_path: Path, mnist_mirror: Path) -> None:
    fetch(Fetch(source="mnist", mirror=str(mnist_mirror)), tmp_path / "raw")
    data = load_raw(Config(fetch=Fetch(source="mnist")), tmp_path / "raw")
    assert data.train[0].shape == (60000, 1, 28, 28)
    assert data.test is not None and data.test[0].shape == (10000, 1, 28, 28)


def test_a_recompressed_mirror_copy_still_verifies(tmp_path: Path, mnist_mirror: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for gz in mnist_mirror.glob("*.gz"):
        (mirror / gz.name).write_bytes(
            gzip.compress(gzip.decompress(gz.read_bytes()), compresslevel=1)
        )
    fetch(Fetch(source="mnist", mirror=f"file://{mirror}"), tmp_path / "raw")
    assert (tmp_path / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 10008


def corrupt_mirror(tmp_path: Path, mnist_mirror: Path) -> Path:
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_mirror, mirror)
    labels = bytearray(gzip.decompress((mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # one wrong label: same size, different content
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    return mirror


def test_checksum_mismatch_fails_and_leaves_no_partial_raw_data(
    tmp_path: Path, mnist_mirror: Path
) -> None:
    mirror = corrupt_mirror(tmp_path, mnist_mirror)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        fetch(Fetch(source="mnist", mirror=str(mirror)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert not list(tmp_path.glob(".raw*"))  # the scratch folder is gone too


def test_failed_fetch_keeps_the_previous_raw_data(tmp_path: Path, mnist_mirror: Path) -> None:
    raw = tmp_path / "raw"
    fetch(Fetch(source="digits"), raw)
    mirror = corrupt_mirror(tmp_path, mnist_mirror)
    with pytest.raises(DataError):
        fetch(Fetch(source="mnist", mirror=str(mirror)), raw)
    assert (raw / "digits.npz").is_file()


def test_cli_checksum_mismatch_exits_2_naming_the_file(workdir: Path, mnist_mirror: Path) -> None:
    mirror = corrupt_mirror(workdir, mnist_mirror)
    result = cnnops("fetch", "--set", "fetch.source=mnist", "--set", f"fetch.mirror={mirror}")
    assert result.returncode == 2
    assert "t10k-labels-idx1-ubyte.gz: checksum mismatch" in result.stderr
    assert not (workdir / "data" / "raw").exists()


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path.write_bytes(header + bytes(28 * 28 * 10 - 5))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated or corrupt IDX file"):
        read_idx(path)
    path.write_bytes(b"\x08\x08\x08\x08")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)


def test_corrupt_gzip_in_mirror_is_named(tmp_path: Path, mnist_mirror: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_mirror, mirror)
    blob = (mirror / "train-labels-idx1-ubyte.gz").read_bytes()
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: corrupt gzip data"):
        fetch(Fetch(source="mnist", mirror=str(mirror)), tmp_path / "raw")


def make_image_folder(root: Path, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for name, shade in (("cats", 40), ("dogs", 200)):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(rng.normal(shade, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(
                root / name / f"{i}.png" if i % 2 else root / name / f"{i}.jpg"
            )
    return root


def test_image_folder_reads_classes_from_subfolders(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets")
    config = Config(
        fetch=Fetch(source="imagefolder", url=str(folder)), prepare=Prepare(image_size=16)
    )
    fetch(config.fetch, tmp_path / "raw")
    data = load_raw(config, tmp_path / "raw")
    assert data.classes == ["cats", "dogs"]
    assert data.train[0].shape == (12, 3, 16, 16)
    assert data.train[0][data.train[1] == 0].mean() < data.train[0][data.train[1] == 1].mean()


def test_image_folder_from_a_zip_archive(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "src" / "pets")
    archive = shutil.make_archive(str(tmp_path / "pets"), "zip", tmp_path / "src")
    config = Config(
        fetch=Fetch(source="imagefolder", url=f"file://{archive}"), prepare=Prepare(image_size=8)
    )
    fetch(config.fetch, tmp_path / "raw")
    assert load_raw(config, tmp_path / "raw").classes == ["cats", "dogs"]
    del folder


def test_truncated_image_is_named(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets")
    bad = folder / "dogs" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    config = Config(
        fetch=Fetch(source="imagefolder", url=str(folder)), prepare=Prepare(image_size=8)
    )
    fetch(config.fetch, tmp_path / "raw")
    with pytest.raises(DataError, match=r"dogs/1.png: unreadable or truncated image"):
        load_raw(config, tmp_path / "raw")
