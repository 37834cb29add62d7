"""Dataset sources: the embedded digits, MNIST-format IDX sets, CIFAR-10 and image folders.

`fetch` brings a source's files into `raw/` (checksum-verified, written atomically);
`load_raw` reads them back as uint8 arrays (N, C, H, W) for the prepare stage.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from cnnops import progress
from cnnops.data.images import is_junk
from cnnops.errors import DataError
from cnnops.runs import atomic_dir

if TYPE_CHECKING:
    from collections.abc import Callable

    from cnnops.config import Config, Fetch
    from cnnops.data.images import Folder, Target

Member = TypeVar("Member")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """The file as served, e.g. `train-images-idx3-ubyte.gz`."""
    sha256: str | None = None
    """Of the decompressed content, so a re-compressed mirror copy still verifies."""
    md5: str | None = None
    """Of the bytes as served canonically; used where no content hash is published."""


# sha256 of the decompressed IDX files (identical across mirrors however they are compressed).
MNIST = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)
# Fashion-MNIST publishes md5s of its .gz files only, so a mirror must serve those exact files.
FASHION_MNIST = (
    RemoteFile("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    RemoteFile("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe"),
    RemoteFile("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310"),
)
CIFAR10 = (RemoteFile("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),)
# md5 of each extracted member: the decompressed content, whatever the archive's compression.
CIFAR10_MEMBERS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CANONICAL = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
FILES = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10}
CLASSES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}
NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}


def input_size(config: Config) -> int:
    """The square image size the model receives, known from params alone."""
    return config.prepare.image_size or NATIVE_SIZE[config.fetch.source]


def open_url(url: str) -> bytes:
    """The bytes at `url`, read a megabyte at a time behind a progress bar (on a terminal)."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or url
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with progress.bar(size, name, unit="B") as bar:
                while chunk := response.read(1 << 20):
                    chunks.append(chunk)
                    bar.update(len(chunk))
            return b"".join(chunks)
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: download failed: {e}") from None


def read_from(location: str, name: str, key: str = "fetch.mirror") -> tuple[bytes, str]:
    """Read `name` (or its decompressed twin) from a folder, file:// URL or http(s) URL, the
    value of setting `key` (named in errors); returns the bytes and where they came from."""
    if "://" in location and not location.startswith("file://"):
        url = location.rstrip("/") + "/" + name
        return open_url(url), url
    folder = Path(location.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise DataError(f"{key} = {location!r}: not a directory")
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate.read_bytes(), str(candidate)
    raise DataError(f"{key} = {location!r}: {name} not found there")


def _decompress(blob: bytes, origin: str) -> bytes:
    if blob[:2] != b"\x1f\x8b":
        return blob
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError) as e:
        raise DataError(f"{origin}: corrupt gzip data ({e})") from None


def _digest(algorithm: str, blob: bytes) -> str:
    return hashlib.new(algorithm, blob, usedforsecurity=False).hexdigest()


def verify(file: RemoteFile, blob: bytes, origin: str) -> bytes:
    """Return the decompressed content of `blob` after checking it against the known hash."""
    if file.sha256:
        content = _decompress(blob, origin)
        if (got := _digest("sha256", content)) != file.sha256:
            raise DataError(
                f"{origin}: checksum mismatch: sha256 of content is {got}, expected {file.sha256}"
            )
        return content
    if file.md5 and (got := _digest("md5", blob)) != file.md5:
        raise DataError(f"{origin}: checksum mismatch: md5 is {got}, expected {file.md5}")
    return blob if file.name.endswith(".tar.gz") else _decompress(blob, origin)


def fetch(spec: Fetch, raw: Path) -> None:
    """Bring the source's files into `raw/`, verified; `raw/` is replaced only on success."""
    with atomic_dir(raw, "fetch") as out:
        if spec.source == "digits":
            with resources.files("cnnops.data").joinpath("digits.npz").open("rb") as f:
                (out / "digits.npz").write_bytes(f.read())
        elif spec.source == "imagefolder":
            _fetch_imagefolder(spec, out)
        else:
            location = spec.mirror or CANONICAL[spec.source]
            for file in FILES[spec.source]:
                blob, origin = read_from(location, file.name)
                content = verify(file, blob, origin)
                if spec.source == "cifar10":
                    _extract_cifar(content, origin, out)
                else:
                    (out / file.name.removesuffix(".gz")).write_bytes(content)


def _extract_cifar(archive: bytes, origin: str, out: Path) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in CIFAR10_MEMBERS and member.isfile():
                    blob = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if _digest("md5", blob) != CIFAR10_MEMBERS[name]:
                        raise DataError(f"{origin}: member {name} fails its md5 check")
                    (out / name).write_bytes(blob)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{origin}: corrupt archive ({e})") from None
    missing = sorted(set(CIFAR10_MEMBERS) - {p.name for p in out.iterdir()})
    if missing:
        raise DataError(f"{origin}: archive lacks {missing}")


def _fetch_imagefolder(spec: Fetch, out: Path) -> None:
    """Copy the folder, or extract the archive, named by fetch.url into `out/images`, leaving
    out junk (see `is_junk`), and note the url in `out/origin.json` so later errors can name
    the user's own file rather than its copy in data/raw."""
    if not spec.url:
        raise DataError(
            "fetch.url: required for fetch.source: imagefolder (a folder or archive URL)"
        )
    remote = "://" in spec.url and not spec.url.startswith("file://")
    local = Path(spec.url.removeprefix("file://")).expanduser()
    if not remote and local.is_dir():
        _copy_folder(local, out / "images")
        _write_origin(out, spec.url, "folder")
        return
    if not remote and not local.is_file():
        raise DataError(
            f"fetch.url = {spec.url!r}: no such file or folder; it must be an existing folder "
            "or a .zip/.tar.gz file, or an http(s) URL"
        )
    blob = open_url(spec.url) if remote else local.read_bytes()
    if spec.sha256 and (got := _digest("sha256", blob)) != spec.sha256:
        raise DataError(
            f"fetch.url = {spec.url!r}: checksum mismatch: sha256 {got}, expected {spec.sha256}"
        )
    try:
        if zipfile.is_zipfile(io.BytesIO(blob)):
            _extract_zip(blob, spec.url, out / "images")
        else:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
                members = _wanted(tar.getmembers(), lambda m: m.name, spec.url)
                tar.extractall(out / "images", members=members, filter="data")
    except tarfile.FilterError as e:
        raise DataError(
            f"fetch.url = {spec.url!r}: archive member {e.tarinfo.name!r} is unsafe ({e}); "
            "members must stay inside the archive's folder"
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(
            f"fetch.url = {spec.url!r}: not a readable folder, zip or tar archive ({e})"
        ) from None
    _write_origin(out, spec.url, "archive")


def _copy_folder(source: Path, target: Path) -> None:
    """Copy an image folder, following symlinks to real files; a broken link is the user's to
    fix, so it is named as the user sees it rather than surfacing as an OSError traceback."""

    def junk(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(source)
        return {name for name in names if is_junk(relative / name)}

    def copy(src: str, dst: str) -> None:
        if os.path.islink(src) and not os.path.exists(src):
            raise DataError(
                f"{src}: broken symbolic link (its target {os.readlink(src)!r} does not exist); "
                "fix or remove it"
            )
        shutil.copy2(src, dst)

    try:
        shutil.copytree(source, target, ignore=junk, copy_function=copy)
    except shutil.Error as e:
        src, _, why = e.args[0][0]
        raise DataError(f"{src}: cannot be copied ({why})") from None


def _wanted(members: list[Member], name: Callable[[Member], str], url: str) -> list[Member]:
    """An archive's members minus junk, after refusing the whole archive if any member's path
    would leave the extraction folder (absolute, or climbing out with `..`): such an archive
    is broken or hostile, and skipping the member quietly would hide that."""
    for member in members:
        parts = name(member).replace("\\", "/").split("/")
        if parts[0] == "" or ":" in parts[0] or ".." in parts:
            raise DataError(
                f"fetch.url = {url!r}: archive member {name(member)!r} is unsafe; members "
                "must stay inside the archive's folder (no absolute paths or '..')"
            )
    return [m for m in members if not is_junk(name(m))]


def _extract_zip(blob: bytes, url: str, target: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        members = _wanted(z.infolist(), lambda m: m.filename, url)
        z.extractall(target, members=members)


def _write_origin(out: Path, url: str, kind: str) -> None:
    (out / "origin.json").write_text(json.dumps({"url": url, "kind": kind}, indent=2) + "\n")


def original_name(raw: Path, path: Path) -> str:
    """The user's own name for `raw/images/<rel>`: `<url>/<rel>` when fetch copied a folder,
    `<url>!/<rel>` when it extracted an archive; `str(path)` when that cannot be known (no
    `raw/origin.json`, or `path` outside `raw/images`)."""
    try:
        relative = Path(os.path.abspath(path)).relative_to(os.path.abspath(raw / "images"))
        origin = json.loads((raw / "origin.json").read_text())
        url, kind = str(origin["url"]), origin["kind"]
    except (ValueError, OSError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        return str(path)
    if kind == "archive":
        return f"{url}!/{relative.as_posix()}"
    return f"{url.rstrip('/')}/{relative.as_posix()}"


# --- reading raw files back -------------------------------------------------------------


@dataclass
class RawData:
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    classes: list[str]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format) of unsigned bytes, checking its header against its size."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run `cnnops fetch` first")
    blob = path.read_bytes()
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(blob) != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: {len(blob)} bytes, header says {expected}"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


def _check_labels(labels: np.ndarray, path: Path, num_classes: int = 10) -> np.ndarray:
    """Labels as int64, each in 0..num_classes-1: a label beyond the classes would otherwise
    surface much later as an index error inside the loss."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise DataError(f"{path}: labels must be one-dimensional, got shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{path}: label {labels[bad[0]]} at index {bad[0]} is out of range "
            f"({len(bad)} such labels); labels must be 0..{num_classes - 1}"
        )
    return labels


def _idx_pair(raw: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
    labels_path = raw / f"{prefix}-labels-idx1-ubyte"
    labels = _check_labels(read_idx(labels_path), labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{raw / f'{prefix}-images-idx3-ubyte'}: expected 3 dimensions (count, rows, "
            f"columns), the header says {images.ndim}"
        )
    if len(images) != len(labels):
        raise DataError(f"{raw}: {prefix} has {len(images)} images but {len(labels)} labels")
    return images[:, None], labels


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing; run `cnnops fetch` first")
    try:
        # The CIFAR batches are pickles by upstream's design; fetch verified each one's md5.
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")  # noqa: S301
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: corrupt CIFAR-10 batch ({e})") from None
    y = _check_labels(y, path)
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def image_folder(raw: Path, config: Config) -> tuple[Folder, Target]:
    """The fetched image folder's files and classes, and the size and channels they decode to."""
    from cnnops.data.images import Target, detect_grayscale, discover

    p = config.prepare
    assert p.image_size is not None  # checked by the Config validator
    folder = discover(raw / "images", lambda path: original_name(raw, path))
    gray = detect_grayscale(folder.files) if p.grayscale is None else p.grayscale
    return folder, Target(p.image_size, 1 if gray else 3, p.min_side)


def _imagefolder(raw: Path, config: Config) -> RawData:
    """The whole folder in memory, for small folders and tests; `cnnops prepare` streams it
    through the decoded-image cache instead (`prepare.prepare_folder`)."""
    from cnnops.data.images import decode

    folder, target = image_folder(raw, config)
    images = []
    for path in folder.files:
        x = decode(path.read_bytes(), target)
        if isinstance(x, str):
            raise DataError(f"{original_name(raw, path)}: {x}")
        images.append(x)
    return RawData(train=(np.stack(images), folder.labels), test=None, classes=folder.classes)


def load_raw(config: Config, raw: Path) -> RawData:
    source = config.fetch.source
    if not raw.is_dir():
        raise DataError(f"{raw}: data directory missing; run `cnnops fetch` first")
    if source == "digits":
        path = raw / "digits.npz"
        if not path.is_file():
            raise DataError(f"{path}: missing; run `cnnops fetch` first")
        with np.load(path) as f:
            return RawData(
                (f["images"][:, None], f["labels"].astype(np.int64)), None, CLASSES[source]
            )
    if source in ("mnist", "fashion-mnist"):
        return RawData(_idx_pair(raw, "train"), _idx_pair(raw, "t10k"), CLASSES[source])
    if source == "cifar10":
        parts = [_cifar_batch(raw / f"data_batch_{i}") for i in range(1, 6)]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return RawData(train, _cifar_batch(raw / "test_batch"), CLASSES[source])
    return _imagefolder(raw, config)
