"""Image folders: which files are read, decoding any format Pillow reads to the target size and
channels, and the cache of decoded images keyed by content hash.

Decoding runs in worker processes that exchange only file names and short verdicts with the
parent: pixels go from the image file to the cache file and from there to the prepared arrays,
so memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import numpy as np

from cnnops.errors import DataError

if TYPE_CHECKING:
    from PIL import Image
from cnnops.runs import die_with_parent, made_by, mark

JUNK_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}
DECODER_VERSION = 1
"""Part of every cache key: bump it when decoding changes, so old entries stop matching."""
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}


def is_junk(relative: PurePath | str) -> bool:
    """Files no user means as data, in folders and archives alike: hidden files and folders
    (".DS_Store", ".git"), macOS AppleDouble files ("._x.jpg") and `__MACOSX/`, Windows'
    Thumbs.db and desktop.ini."""
    return any(part.startswith(".") or part in JUNK_NAMES for part in PurePath(relative).parts)


def image_suffixes() -> set[str]:
    """Every file suffix Pillow has a decoder for (.png, .jpg, .webp, .bmp, .tif, .gif, ...)."""
    from PIL import Image

    Image.init()
    return {s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass
class Folder:
    """An image folder as found on disk: class names, and each image file with its label."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    ignored: list[Path]
    """Files in the class folders that are not images by their suffix (notes.txt, labels.csv)."""


def class_root(images: Path) -> Path:
    """The folder holding the class folders: an archive often wraps them in one top folder."""
    root = images
    suffixes = image_suffixes()
    while root.is_dir():
        entries = [p for p in root.iterdir() if not is_junk(p.name)]
        subdirs = [p for p in entries if p.is_dir()]
        if len(subdirs) != 1 or any(p.suffix.lower() in suffixes for p in entries):
            break
        root = subdirs[0]
    return root


def discover(images: Path, name: Callable[[Path], str] = str) -> Folder:
    """List the class folders under `images` and the image files in each (recursively, sorted,
    junk skipped). `name` turns a path into the one the user knows, for messages."""
    root = class_root(images)
    if not root.is_dir():
        raise DataError(f"{root}: missing; run `cnnops fetch` first")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_junk(p.name))
    if len(classes) < 2:
        raise DataError(f"{name(root)}: needs at least two class sub-folders, found {classes}")
    suffixes = image_suffixes()
    files: list[Path] = []
    labels: list[int] = []
    ignored: list[Path] = []
    for label, cls in enumerate(classes):
        found = 0
        for path in sorted((root / cls).rglob("*")):
            if is_junk(path.relative_to(root)) or path.is_dir():
                continue
            if path.suffix.lower() not in suffixes:
                ignored.append(path)
                continue
            files.append(path)
            labels.append(label)
            found += 1
        if not found:
            raise DataError(
                f"{name(root / cls)}: class folder holds no images, so it would be a class "
                "never seen in training; add images or remove the folder"
            )
    return Folder(root, classes, files, np.asarray(labels, dtype=np.int64), ignored)


def detect_grayscale(files: list[Path]) -> bool:
    """True when the first images are all single-channel (then the whole set is read so)."""
    from PIL import Image

    for path in files[:50]:
        try:
            with Image.open(path) as img:
                if img.mode not in GRAY_MODES:
                    return False
        except (OSError, ValueError, SyntaxError):
            continue
    return True


@dataclass(frozen=True)
class Target:
    """What every image becomes: `channels` x `size` x `size` uint8."""

    size: int
    channels: int
    min_side: int

    @property
    def nbytes(self) -> int:
        return self.channels * self.size * self.size

    def key(self, content: bytes) -> str:
        h = hashlib.blake2b(content, digest_size=20)
        h.update(f"|v{DECODER_VERSION}|{self.size}|{self.channels}|{self.min_side}".encode())
        return h.hexdigest()


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer and float images as 8-bit grayscale, scaled, not clipped."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode != "I" or a.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def decode(content: bytes, target: Target) -> np.ndarray | str:
    """An image file's `content` as a (C, size, size) uint8 array, or the reason it cannot be
    one (from bytes, not a path, so no reason quotes the copy under data/raw)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as opened:
                w, h = opened.size
                if min(w, h) < target.min_side:
                    return f"{w}x{h} pixels, below prepare.min_side = {target.min_side}"
                mode = "L" if target.channels == 1 else "RGB"
                opened.draft(mode, (target.size, target.size))  # JPEG: decode at reduced scale
                img = ImageOps.exif_transpose(_to_8bit(opened))
                if img.mode == "P" or (img.mode in ("LA", "La", "PA") and mode == "RGB"):
                    img = img.convert("RGBA")
                img = img.convert(mode).resize(
                    (target.size, target.size), Image.Resampling.BILINEAR
                )
                x = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"refused as a possible decompression bomb ({e})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        return f"unreadable or truncated image ({e})"
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


class Cache:
    """Decoded images, one raw uint8 file each, named by the content hash of the image file and
    the target; prepare only ever adds to it, so a changed folder decodes only what is new."""

    def __init__(self, folder: Path, target: Target) -> None:
        self.folder, self.target = folder, target

    def open(self) -> None:
        """Create the folder (marked as prepare's), or check that an existing one is ours."""
        theirs = (
            f"{self.folder}: exists and was not created by cnnops prepare, which keeps its "
            "decoded-image cache there; move it away or point paths.prepared elsewhere"
        )
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise DataError(theirs)
        if self.folder.is_dir() and any(self.folder.iterdir()):
            if made_by(self.folder) != "prepare":
                raise DataError(theirs)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        mark(self.folder, "prepare")

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.u8"

    def read(self, key: str) -> np.ndarray:
        t = self.target
        return np.fromfile(self.path(key), dtype=np.uint8).reshape(t.channels, t.size, t.size)

    def has(self, key: str) -> bool:
        try:
            return self.path(key).stat().st_size == self.target.nbytes
        except OSError:
            return False

    def put(self, key: str, x: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        x.tofile(tmp)
        os.replace(tmp, path)  # whole or absent: a killed prepare leaves no torn entry


@dataclass(frozen=True)
class Verdict:
    key: str
    reason: str | None
    """Why the file is bad; None when it is in the cache now."""
    decoded: bool


def _one(path: Path, cache: Cache) -> Verdict:
    try:
        content = path.read_bytes()
    except OSError as e:
        return Verdict("", f"unreadable ({e.strerror or e})", False)
    key = cache.target.key(content)
    if cache.has(key):
        return Verdict(key, None, False)
    x = decode(content, cache.target)
    if isinstance(x, str):
        return Verdict(key, x, True)
    cache.put(key, x)
    return Verdict(key, None, True)


def _batch(paths: list[Path], cache: Cache) -> list[Verdict]:
    return [_one(p, cache) for p in paths]


def _worker_init() -> None:
    """Ctrl-C is the parent's to handle; a worker whose parent dies goes too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def decode_all(files: list[Path], cache: Cache, workers: int) -> list[Verdict]:
    """Bring every file into the cache (in `workers` processes; 0: one per core), with a
    progress bar on a terminal. Returns one verdict per file, in order."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    chunk = 64
    bar = tqdm(total=len(files), unit="img", desc="prepare", disable=not sys.stderr.isatty())
    verdicts: list[Verdict] = []
    with bar:
        if workers == 1 or len(files) <= chunk:
            for part in _chunks(files, chunk):
                verdicts += _batch(part, cache)
                bar.update(len(part))
            return verdicts
        # Spawned, not forked: a worker needs only this module, not the parent's torch.
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
        try:
            for done in pool.map(_batch, _chunks(files, chunk), repeat(cache)):
                verdicts += done
                bar.update(len(done))
        except BaseException:  # a signal or an error: drop the queued work, don't finish it
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return verdicts
