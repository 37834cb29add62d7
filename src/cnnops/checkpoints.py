"""Reading checkpoints safely: weights-only loading, and every unreadable file a one-line DataError.

A checkpoint is only ever unpickled with `weights_only=True`: tensors, containers and numbers, no
code. A file that needs more is refused as not ours, never loaded with a weaker setting.
"""

from __future__ import annotations

import hashlib
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cnnops.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from cnnops.module import Classifier

Module = TypeVar("Module", bound="nn.Module")

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of the file at `path`, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def why_unreadable(path: Path, error: BaseException) -> str:
    """A few words on why torch could not load `path`, never torch's own advice."""
    text = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"holds an object of type {refused.group(1)}, which a weights-only load refuses"
    if not zipfile.is_zipfile(path):
        return "truncated or not a PyTorch checkpoint"
    if "weights only load failed" in text.lower():
        return "holds objects a weights-only load refuses"
    return f"corrupt PyTorch checkpoint ({type(error).__name__})"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, loaded on the CPU with `weights_only=True`.

    A missing, empty, truncated or foreign file, or one holding objects a weights-only load
    refuses, is a DataError naming the file and saying why in a few words."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint missing; run `cnnops train` first")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: checkpoint unreadable: empty file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage fails in many ways (KeyError, EOFError, UnpicklingError...)
        raise DataError(f"{path}: checkpoint unreadable: {why_unreadable(path, e)}") from None
    if not isinstance(checkpoint, dict):
        raise DataError(
            f"{path}: checkpoint unreadable: holds a {type(checkpoint).__name__}, "
            "expected a dict of weights"
        )
    return checkpoint


def load_classifier(path: Path) -> Classifier:
    """The Classifier saved in the Lightning checkpoint at `path`, on the CPU, in eval mode.

    Rebuilt from the checkpoint's own hyper_parameters and state_dict; a checkpoint lacking them,
    or whose weights do not fit the network they describe, is a DataError naming the file."""
    from cnnops.module import Classifier

    return rebuild(Classifier, path)


def rebuild(build: Callable[..., Module], path: Path) -> Module:
    """`build(**hyper_parameters)` of the checkpoint at `path`, its state_dict loaded, in eval
    mode: the Classifier, or a module that takes the same state (`cnnops.registry.network`)."""
    path = Path(path)
    checkpoint = load_checkpoint(path)
    hparams, state = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise DataError(
            f"{path}: not a cnnops checkpoint: expected the hyper_parameters and state_dict "
            "that `cnnops train` saves"
        )
    try:
        model = build(**hparams)
        model.load_state_dict(state)
    except Exception as e:  # wrong keys, shapes or hyper-parameters: all the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path}: not a cnnops checkpoint: its weights do not fit the network its "
            f"hyper_parameters describe ({first[:200]})"
        ) from None
    return model.eval()
