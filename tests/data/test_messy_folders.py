"""Messy real-world inputs through the real CLI: junk in folders and archives, bad paths and
links, damaged IDX and CIFAR files, and image folders with odd, broken or unusual images.

Each case must end in success or in exit status 2 with one line naming the culprit as the user
knows it (their own folder or archive, not its copy under data/raw) - never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnops.data.sources import original_name
from tests.conftest import cnnops, set_args

CLASSES = ("cats", "dogs")
PER_CLASS = 6


# --- building inputs ----------------------------------------------------------------------


def save_rgb(path: Path, shade: int, size: int = 12) -> None:
    """A tiny RGB image of one shade plus noise, so the two classes differ and none is blank."""
    rng = np.random.default_rng(shade + len(path.name))
    pixels = np.clip(rng.normal(shade, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A good image folder: two classes of six 12x12 RGB images each, PNG and JPEG mixed."""
    root = tmp_path / "user" / "pets"  # apart from the project in tmp_path
    for name, shade in zip(CLASSES, (40, 200), strict=True):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            save_rgb(root / name / f"{i}.{'png' if i % 2 else 'jpg'}", shade)
    return root


def imagefolder(url: str | Path, *overrides: str) -> list[str]:
    """The `--set` options that point the pipeline at an image folder or archive."""
    sets = ["fetch.source=imagefolder", f"fetch.url={url}", "prepare.image_size=16", *overrides]
    return set_args(*sets)


def fetch_and_prepare(url: str | Path, *overrides: str) -> subprocess.CompletedProcess:
    """Fetch (which must succeed) then prepare; the prepare result is what a test judges."""
    cnnops("fetch", *imagefolder(url, *overrides), check=True)
    return cnnops("prepare", *imagefolder(url, *overrides))


def error_line(result: subprocess.CompletedProcess, stage: str) -> str:
    """The single error line of a failed stage, checking it is exactly one `cnnops` line."""
    assert result.returncode == 2, f"{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cnnops {stage}: error: "), lines[0]
    return lines[0]


def totals(result: subprocess.CompletedProcess) -> int:
    """The number of images over all splits, from the JSON line `cnnops prepare` prints."""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    return sum(counts.values())


def report_totals(workdir: Path) -> int:
    report = json.loads((workdir / "reports" / "data.json").read_text())
    return sum(split["total"] for split in report["splits"].values())


def prepared_classes(workdir: Path) -> list[str]:
    return json.loads((workdir / "data" / "prepared" / "meta.json").read_text())["classes"]


def prepared_images(workdir: Path) -> np.ndarray:
    """Every prepared image, all splits together."""
    prepared = workdir / "data" / "prepared"
    return np.concatenate([np.load(prepared / f"{s}_x.npy") for s in ("train", "val", "test")])


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- the fetch side: junk, paths and links ------------------------------------------------


def test_finder_zip_junk_is_ignored_and_makes_no_class(workdir: Path, folder: Path) -> None:
    archive = workdir / "pets.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*.*")):
            name = path.relative_to(folder.parent).as_posix()
            z.write(path, name)
            # What the Finder adds: AppleDouble twins under __MACOSX/ and beside the files.
            parent, _, base = name.rpartition("/")
            z.writestr(f"__MACOSX/{parent}/._{base}", b"\x00\x05\x16\x07 resource fork")
        z.writestr("pets/.DS_Store", b"\x00\x00\x00\x01Bud1")
        z.writestr("pets/cats/._stray.jpg", b"not an image")
    assert cnnops("fetch", *imagefolder(archive)).returncode == 0

    raw = workdir / "data" / "raw"
    assert relative_files(raw / "images" / "pets") == relative_files(folder)
    assert [p.name for p in (raw / "images").iterdir()] == ["pets"]
    assert json.loads((raw / "origin.json").read_text()) == {"url": str(archive), "kind": "archive"}
    result = cnnops("prepare", *imagefolder(archive))
    assert totals(result) == 2 * PER_CLASS
    assert prepared_classes(workdir) == list(CLASSES)


def test_hidden_files_and_windows_junk_in_a_folder_are_ignored(workdir: Path, folder: Path) -> None:
    expected = relative_files(folder)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "cats" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnails")
    (folder / "dogs" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (folder / "dogs" / "._0.jpg").write_bytes(b"AppleDouble")
    (folder / ".thumbnails").mkdir()  # a hidden folder full of images is still no class
    for i in range(3):
        save_rgb(folder / ".thumbnails" / f"{i}.png", 120)

    result = fetch_and_prepare(folder)
    raw = workdir / "data" / "raw"
    assert relative_files(raw / "images") == expected
    assert json.loads((raw / "origin.json").read_text()) == {"url": str(folder), "kind": "folder"}
    assert totals(result) == 2 * PER_CLASS
    assert prepared_classes(workdir) == list(CLASSES)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_missing_local_url_names_fetch_url(workdir: Path, scheme: str) -> None:
    url = f"{scheme}{workdir / 'no-such-pets.zip'}"
    line = error_line(cnnops("fetch", *imagefolder(url)), "fetch")
    assert "fetch.url" in line and repr(url) in line
    assert "existing folder" in line and "http" in line
    assert not (workdir / "data" / "raw").exists()


def test_a_broken_symlink_is_named(workdir: Path, folder: Path) -> None:
    link = folder / "cats" / "gone.png"
    link.symlink_to(workdir / "deleted-long-ago.png")
    line = error_line(cnnops("fetch", *imagefolder(folder)), "fetch")
    assert f"{link}: broken symbolic link" in line
    assert not (workdir / "data" / "raw").exists()


def test_a_symlink_to_a_real_image_is_followed(workdir: Path, folder: Path) -> None:
    elsewhere = workdir / "elsewhere.png"
    save_rgb(elsewhere, 40)
    (folder / "cats" / "linked.png").symlink_to(elsewhere)
    cnnops("fetch", *imagefolder(folder), check=True)
    copy = workdir / "data" / "raw" / "images" / "cats" / "linked.png"
    assert not copy.is_symlink() and copy.read_bytes() == elsewhere.read_bytes()


def test_junk_in_a_tar_archive_is_ignored(workdir: Path, folder: Path) -> None:
    archive = workdir / "pets.tar.gz"
    (folder / "cats" / "._0.jpg").write_bytes(b"AppleDouble")  # what macOS tar adds
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="pets")
    cnnops("fetch", *imagefolder(archive), check=True)
    images = workdir / "data" / "raw" / "images" / "pets"
    assert relative_files(images) == {
        f"{name}/{i}.{'png' if i % 2 else 'jpg'}" for name in CLASSES for i in range(PER_CLASS)
    }


def test_original_name_maps_copies_back_to_the_users_names(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    copy = raw / "images" / "cats" / "1.png"
    copy.parent.mkdir(parents=True)
    assert original_name(raw, copy) == str(copy)  # no origin.json: nothing better is known
    (raw / "origin.json").write_text(json.dumps({"url": "~/pets/", "kind": "folder"}))
    assert original_name(raw, copy) == "~/pets/cats/1.png"
    assert original_name(raw, tmp_path / "other.png") == str(tmp_path / "other.png")
    url = "https://example.org/pets.zip"
    (raw / "origin.json").write_text(json.dumps({"url": url, "kind": "archive"}))
    assert original_name(raw, copy) == f"{url}!/cats/1.png"
    (raw / "origin.json").write_text("{not json")
    assert original_name(raw, copy) == str(copy)


def test_an_archive_member_escaping_its_folder_is_refused(workdir: Path) -> None:
    archive = workdir / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pets/cats/0.png", b"x")
        z.writestr("../outside.png", b"x")
    line = error_line(cnnops("fetch", *imagefolder(archive)), "fetch")
    assert "'../outside.png'" in line and "unsafe" in line
    assert not (workdir.parent / "outside.png").exists()
    assert not (workdir / "data" / "raw").exists()


# --- IDX and CIFAR-10 files -----------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(raw: Path, n: int = 40) -> None:
    """A tiny, valid MNIST-format set in `raw`, as `cnnops fetch` would leave it."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def prepare_mnist() -> subprocess.CompletedProcess:
    return cnnops("prepare", "--set", "fetch.source=mnist", "--set", "prepare.val_fraction=0.5")


def test_a_valid_tiny_idx_set_prepares(workdir: Path) -> None:
    """The control for the damaged-IDX tests below: only their damage makes them fail."""
    write_mnist(workdir / "data" / "raw")
    assert totals(prepare_mnist()) == 80


def test_an_idx_label_out_of_range_is_named(workdir: Path) -> None:
    raw = Path("data", "raw")  # as params.yaml names it, and so as messages name its files
    write_mnist(raw)
    labels = np.arange(40) % 10
    labels[7] = 12
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    line = error_line(prepare_mnist(), "prepare")
    assert f"{raw / 't10k-labels-idx1-ubyte'}: label 12" in line
    assert "0..9" in line


def test_an_idx_file_with_a_bad_magic_number_is_named(workdir: Path) -> None:
    raw = Path("data", "raw")
    write_mnist(raw)
    blob = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
    blob[2] = 0x0D  # float data, which no MNIST-format set holds
    (raw / "train-labels-idx1-ubyte").write_bytes(blob)
    line = error_line(prepare_mnist(), "prepare")
    assert f"{raw / 'train-labels-idx1-ubyte'}: " in line and "bad magic number" in line


def test_a_truncated_idx_file_is_named(workdir: Path) -> None:
    raw = Path("data", "raw")
    write_mnist(raw)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    line = error_line(prepare_mnist(), "prepare")
    assert f"{path}: truncated" in line


def write_cifar(raw: Path, bad_label: int | None = None) -> None:
    """Six tiny CIFAR-10 python batches; `bad_label`, if given, goes into data_batch_3."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(20)]
        if bad_label is not None and name == "data_batch_3":
            labels[5] = bad_label
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": labels}
        with (raw / name).open("wb") as f:
            pickle.dump(batch, f)


def prepare_cifar() -> subprocess.CompletedProcess:
    return cnnops("prepare", "--set", "fetch.source=cifar10")


def test_a_valid_tiny_cifar_set_prepares(workdir: Path) -> None:
    write_cifar(workdir / "data" / "raw")
    assert totals(prepare_cifar()) == 120


@pytest.mark.parametrize("label", [10, -1])
def test_a_cifar_label_out_of_range_is_named(workdir: Path, label: int) -> None:
    raw = Path("data", "raw")
    write_cifar(raw, bad_label=label)
    line = error_line(prepare_cifar(), "prepare")
    assert f"{raw / 'data_batch_3'}: label {label}" in line and "0..9" in line


# --- the prepare side: odd, broken and unusual images ---------------------------------------


def test_an_empty_class_folder_is_an_error_naming_it(workdir: Path, folder: Path) -> None:
    (folder / "birds").mkdir()
    line = error_line(fetch_and_prepare(folder), "prepare")
    assert "empty" in line and "birds" in line
    assert not (workdir / "data" / "prepared").exists()
    assert not (workdir / "reports" / "data.json").exists()


def test_16_bit_grayscale_is_scaled_not_clipped(workdir: Path, tmp_path: Path) -> None:
    root = tmp_path / "scans"
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for name, pixels in (("rising", ramp), ("falling", ramp[::-1].copy())):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = Image.fromarray(pixels)
            assert image.mode == "I;16"
            image.save(root / name / f"{i}.png")
    assert totals(fetch_and_prepare(root)) == 2 * PER_CLASS
    x = prepared_images(workdir)
    # Clipping to 8 bits would leave only 0 and 255 with a mean near 255; scaling keeps the ramp.
    assert len(np.unique(x)) > 2
    assert 100 < x.mean() < 155


def bad_files(workdir: Path) -> list[dict[str, str]]:
    return json.loads((workdir / "reports" / "data_errors.json").read_text())["bad_files"]


def test_a_1x1_image_is_a_bad_file_below_min_side(workdir: Path, folder: Path) -> None:
    Image.new("RGB", (1, 1), (40, 40, 40)).save(folder / "cats" / "dot.png")
    line = error_line(fetch_and_prepare(folder), "prepare")
    assert f"{folder / 'cats' / 'dot.png'}" in line
    [entry] = bad_files(workdir)
    assert entry["file"] == f"{folder}/cats/dot.png"
    assert "prepare.min_side" in entry["reason"]


def test_webp_bmp_and_tiff_images_are_read(workdir: Path, folder: Path) -> None:
    for suffix in ("webp", "bmp", "tif"):
        save_rgb(folder / "cats" / f"extra.{suffix}", 40)
    result = fetch_and_prepare(folder)
    assert totals(result) == 2 * PER_CLASS + 3
    assert report_totals(workdir) == 2 * PER_CLASS + 3


def write_bomb_png(path: Path, width: int = 20000, height: int = 10000) -> None:
    """A valid 1-bit PNG of width x height black pixels: a few kilobytes on disk, more pixels
    than Pillow agrees to decode (twice Image.MAX_IMAGE_PIXELS)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed bits
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(row * height, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_a_bad_file_not_a_traceback(workdir: Path, folder: Path) -> None:
    bomb = folder / "dogs" / "huge.png"
    write_bomb_png(bomb)
    with pytest.raises(Image.DecompressionBombError):  # a valid PNG: only its size is refused
        Image.open(bomb)
    line = error_line(fetch_and_prepare(folder), "prepare")
    assert str(bomb) in line
    [entry] = bad_files(workdir)
    assert entry["file"] == f"{folder}/dogs/huge.png" and entry["reason"]


def add_bad_files(folder: Path) -> list[str]:
    """Three broken JPEGs and a 1x1 image in the good folder; their names as the user knows them."""
    good = (folder / "cats" / "0.jpg").read_bytes()
    (folder / "cats" / "garbage.jpg").write_bytes(b"this is not a JPEG at all")
    (folder / "cats" / "empty.jpg").write_bytes(b"")
    (folder / "dogs" / "cut.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (1, 1)).save(folder / "dogs" / "dot.png")
    return [f"{folder}/{rel}" for rel in ("cats/garbage.jpg", "cats/empty.jpg", "dogs/cut.jpg")] + [
        f"{folder}/dogs/dot.png"
    ]


def test_all_bad_files_are_reported_in_one_run(workdir: Path, folder: Path) -> None:
    names = add_bad_files(folder)
    line = error_line(fetch_and_prepare(folder), "prepare")
    assert re.search(r"\b4\b", line), line
    assert any(name in line for name in names), line
    assert "data/raw" not in line
    reported = bad_files(workdir)
    assert sorted(entry["file"] for entry in reported) == sorted(names)
    assert all(entry["reason"] for entry in reported)
    data = workdir / "data"
    assert not (data / "prepared").exists()
    # The decoded-image cache stays (good images need no second decoding); nothing partial.
    assert sorted(p.name for p in data.iterdir()) == ["prepared.cache", "raw"]


def test_bad_files_are_skipped_and_listed_when_asked(workdir: Path, folder: Path) -> None:
    names = add_bad_files(folder)
    result = fetch_and_prepare(folder, "prepare.on_bad_file=skip")
    assert totals(result) == 2 * PER_CLASS
    report = json.loads((workdir / "reports" / "data.json").read_text())
    assert sum(split["total"] for split in report["splits"].values()) == 2 * PER_CLASS
    assert sorted(entry["file"] for entry in report["skipped"]) == sorted(names)
    assert all(entry["reason"] for entry in report["skipped"])
    dot = next(e for e in report["skipped"] if e["file"].endswith("dot.png"))
    assert "prepare.min_side" in dot["reason"]


def test_rgba_palette_and_cmyk_images_become_rgb(workdir: Path, folder: Path) -> None:
    cats = folder / "cats"
    Image.new("RGBA", (12, 12), (40, 40, 40, 128)).save(cats / "alpha.png")
    Image.new("RGB", (12, 12), (40, 60, 40)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        cats / "palette.png"
    )
    Image.new("CMYK", (12, 12), (200, 200, 200, 0)).save(cats / "print.jpg")
    for name, mode in (("alpha.png", "RGBA"), ("palette.png", "P"), ("print.jpg", "CMYK")):
        with Image.open(cats / name) as image:
            assert image.mode == mode
    assert totals(fetch_and_prepare(folder)) == 2 * PER_CLASS + 3
    x = prepared_images(workdir)
    assert x.shape[1:] == (3, 16, 16)


def test_a_relative_fetch_url_names_bad_files_as_given(workdir: Path, folder: Path) -> None:
    """A bad file is named by the path the user wrote, relative as given, not by its copy."""
    Image.new("RGB", (1, 1)).save(folder / "cats" / "dot.png")
    relative = os.path.relpath(folder, workdir)
    line = error_line(fetch_and_prepare(relative), "prepare")
    assert f"{relative}/cats/dot.png" in line
