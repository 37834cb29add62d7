"""A photo-like image folder made locally, for trying transfer learning without a download: the
embedded 8x8 digits upscaled onto random-colour backgrounds, RGB JPEGs in one folder per class."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np


def colour_digits(root: Path, n: int, side: int = 96, seed: int = 0, start: int = 0) -> Path:
    """Write images `start` .. `start + n - 1` under `root/<digit>/`; the same index always
    gives the same file, so a second call with a larger `start` adds new images only."""
    from PIL import Image

    with resources.files("cnnops.data").joinpath("digits.npz").open("rb") as f, np.load(f) as d:
        digits, labels = d["images"], d["labels"]
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        k = i % len(digits)
        ink = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.Resampling.BILINEAR))
        background = rng.integers(0, 256, size=3)
        colour = 255 - background
        alpha = ink[..., None].astype(np.float32) / 255.0
        rgb = (alpha * colour + (1 - alpha) * background).astype(np.uint8)
        rgb = np.clip(rgb + rng.integers(-8, 9, size=rgb.shape), 0, 255).astype(np.uint8)
        folder = root / str(labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:06d}.jpg", quality=90)
    return root
