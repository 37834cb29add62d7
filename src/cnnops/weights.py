"""Pretrained ImageNet weights: torchvision's weight files, fetched once and verified.

`fetch_weights` brings torchvision's IMAGENET1K_V1 file for an architecture into a folder, under
torchvision's own file name, from download.pytorch.org or from a mirror (a folder, `file://` or
http(s) URL holding the same file names). It is verified the way `torch.hub` verifies it: the
hex after the last '-' of the file name must begin the file's SHA-256. Nothing is written
before the file verifies, and a file already there is never overwritten or deleted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cnnops.checkpoints import sha256_file
from cnnops.data.sources import open_url, read_from
from cnnops.errors import ConfigError, DataError

NAMES = ("resnet18", "resnet50", "vgg16", "inception_v3", "efficientnet_b0", "mobilenet_v2")
"""The architectures whose ImageNet weights `cnnops weights` fetches."""


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


def fetch_weights(name: str, folder: Path = Path("weights"), mirror: str | None = None) -> Fetched:
    """Bring torchvision's ImageNet weights for `name` into `folder`, verified.

    A verified file already there is kept as it is (`source` None); one that does not verify
    is an error naming it, never overwritten."""
    url = weights_url(name)
    file_name = url.rsplit("/", 1)[-1]
    prefix, target = hash_prefix(file_name), folder / file_name
    if os.path.lexists(target):
        return _existing(target, prefix, name)
    blob, source = read_from(mirror, file_name, "--mirror") if mirror else (open_url(url), url)
    digest = hashlib.sha256(blob).hexdigest()
    if not digest.startswith(prefix):
        raise DataError(
            f"{source}: checksum mismatch: sha256 {digest} does not begin with {prefix}, "
            "the hash in the file name"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{file_name}.{os.getpid()}.part"
        tmp.write_bytes(blob)
    except OSError as e:
        raise DataError(f"--dir {str(folder)!r}: cannot write there: {e}") from None
    try:
        os.link(tmp, target)  # fails, rather than replaces, when `target` appeared meanwhile
    except FileExistsError:
        return _existing(target, prefix, name)
    finally:
        tmp.unlink()
    return Fetched(target, digest, source)
