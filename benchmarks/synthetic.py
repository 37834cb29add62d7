"""The synthetic image folder of the scale benchmarks: `cnnops.data.demo.colour_digits`, the
embedded digits upscaled onto random-colour backgrounds (made locally, no download)."""

from __future__ import annotations

from pathlib import Path

from cnnops.data.demo import colour_digits


def make_folder(root: Path, n: int, side: int = 256, seed: int = 0, start: int = 0) -> Path:
    """`n` RGB JPEGs of `side` px under `root/<digit>/` (see `colour_digits`)."""
    return colour_digits(root, n, side, seed, start)
