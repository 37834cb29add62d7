"""Pretrained ImageNet weights: torchvision's weight files, fetched once and verified.

`fetch_weights` brings torchvision's IMAGENET1K_V1 file for an architecture into a folder, under
torchvision's own file name, from download.pytorch.org or from a mirror (a folder or `file://`
URL holding the same file names). It is verified the way `torch.hub` verifies it: the hex after
the last '-' of the file name must begin the file's SHA-256. The file is written to a temporary
name beside its target and renamed into place, so a failed or interrupted fetch leaves nothing;
a file already there is never overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cnnops.checkpoints import sha256_file
from cnnops.errors import ConfigError, DataError

NAMES = ("resnet18", "resnet50", "vgg16", "inception_v3", "efficientnet_b0", "mobilenet_v2")
"""The architectures whose ImageNet weights `cnnops weights` fetches."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    source: str | None
    """Where it was read from; None when a verified copy was already there, left as it was."""


def weights_url(name: str) -> str:
    """torchvision's URL of the IMAGENET1K_V1 weights of architecture `name`."""
    if name not in NAMES:
        raise ConfigError(f"unknown weights {name!r}: choose one of {', '.join(NAMES)}")
    from torchvision.models import get_model_weights

    return str(get_model_weights(name).IMAGENET1K_V1.url)


def hash_prefix(file_name: str) -> str:
    """The hex after the last '-' of `file_name` (before its suffix), as torch.hub reads it."""
    stem = file_name.split(".", 1)[0]
    _, dash, prefix = stem.rpartition("-")
    if not dash or not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise DataError(f"{file_name}: no hash after a '-' in the file name, cannot verify it")
    return prefix


def _source(file_name: str, url: str, mirror: str | None) -> str:
    """Where to read `file_name` from: its URL, a mirror URL, or a file in a mirror folder."""
    if mirror is None:
        return url
    if "://" in mirror and not mirror.startswith("file://"):
        return mirror.rstrip("/") + "/" + file_name
    if mirror.startswith("file://"):
        folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(mirror).path))
    else:
        folder = Path(mirror).expanduser()
    if not folder.is_dir():
        raise DataError(f"--mirror {mirror!r}: not a directory")
    path = folder / file_name
    if not path.is_file():
        raise DataError(f"--mirror {mirror!r}: {file_name} not found there")
    return str(path)


def _open(source: str) -> BinaryIO:
    try:
        if "://" in source:
            return urllib.request.urlopen(source, timeout=60)  # type: ignore[no-any-return]
        return open(source, "rb")
    except (OSError, ValueError) as e:
        raise DataError(f"{source}: download failed: {e}") from None


def _copy(source: str, out: BinaryIO) -> str:
    """Copy `source` into `out` a megabyte at a time and return its hex SHA-256; a read
    failure is a DataError."""
    digest = hashlib.sha256()
    with _open(source) as src:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except OSError as e:
                raise DataError(f"{source}: download failed: {e}") from None
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
            out.write(chunk)


def _existing(path: Path, prefix: str, name: str) -> Fetched:
    """A file already at `path`: accepted if verified, otherwise an error that leaves it alone."""
    if not path.is_file():
        raise DataError(f"{path} exists and is not a file; move it away and run again")
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise DataError(
            f"{path} already exists but is not torchvision's {name} weights (sha256 {digest} "
            f"does not begin with {prefix}); it was left untouched: move it away and run again"
        )
    return Fetched(path, digest, source=None)


def _publish(tmp: Path, target: Path, prefix: str, name: str) -> Fetched | None:
    """Give `tmp` the name `target` without ever replacing a file there; None when it did."""
    try:
        os.link(tmp, target)  # fails, rather than replaces, when `target` appeared meanwhile
    except FileExistsError:
        return _existing(target, prefix, name)
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            return _existing(target, prefix, name)
        os.replace(tmp, target)
        return None
    tmp.unlink()
    return None


def fetch_weights(
    name: str,
    folder: Path = Path("weights"),
    mirror: str | None = None,
) -> Fetched:
    """Bring torchvision's ImageNet weights for `name` into `folder`, verified.

    A verified file already there is kept as it is (`source` None); one that does not verify
    is an error naming it, never overwritten."""
    url = weights_url(name)
    file_name = url.rsplit("/", 1)[-1]
    prefix = hash_prefix(file_name)
    target = folder / file_name
    if os.path.lexists(target):
        return _existing(target, prefix, name)
    source = _source(file_name, url, mirror)
    made = not folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--dir {str(folder)!r}: cannot create it: {e}") from None
    tmp = folder / f".{file_name}.{secrets.token_hex(4)}.part"
    try:
        try:
            with open(tmp, "xb") as out:
                digest = _copy(source, out)
        except OSError as e:
            raise DataError(f"{tmp}: cannot write: {e}") from None
        if not digest.startswith(prefix):
            raise DataError(
                f"{source}: checksum mismatch: sha256 {digest} does not begin with {prefix}, "
                f"the hash in the file name"
            )
        found = _publish(tmp, target, prefix, name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if made:  # a folder this call created goes too, if it is still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return found or Fetched(target, digest, source)
