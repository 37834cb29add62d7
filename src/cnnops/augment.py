"""The augmentation spec from params → an Albumentations `Compose`; the vocabulary lives here.

Each vocabulary entry names its parameters with a plain meaning (degrees, fractions of the image
side, pixel-value fractions) and says which are magnitudes that `augment.strength` scales. The
CPU engine maps them onto an Albumentations 2.0.8 class; a batched on-device engine reads the same
entries through `resolve()` so both draw from the same distributions.

Normalization is not part of the pipeline: transforms output uint8 images and the
`Classifier` normalizes on the device with the mean/std stored in its checkpoint. One place
normalizes for every path (resident fast path, DataLoader workers, serving), and uint8 batches are
a quarter of the bytes to ship from workers and to the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops.errors import ConfigError

if TYPE_CHECKING:
    import albumentations as A
    import numpy as np

    from cnnops.config import Augment


@dataclass(frozen=True)
class Param:
    default: float
    low: float
    high: float
    meaning: str
    scaled: bool = True
    """A magnitude: multiplied by `augment.strength` (0 leaves the image unchanged)."""
    integer: bool = False


@dataclass(frozen=True)
class Entry:
    albumentations: str
    """The Albumentations 2.0.8 class this entry builds."""
    params: dict[str, Param] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    """Albumentations argument → the entry parameter it comes from, to name errors by our key."""


VOCABULARY: dict[str, Entry] = {
    "affine": Entry(
        "Affine",
        {
            "rotate": Param(
                15.0, 0.0, 180.0, "max |angle| in degrees, uniform in [-rotate, rotate]"
            ),
            "translate": Param(0.1, 0.0, 0.5, "max shift as a fraction of the side, per axis"),
            "scale": Param(0.1, 0.0, 0.9, "zoom factor uniform in [1 - scale, 1 + scale]"),
            "shear": Param(0.0, 0.0, 45.0, "max |shear| in degrees, per axis"),
        },
        {"rotate": "rotate", "translate_percent": "translate", "scale": "scale", "shear": "shear"},
    ),
    "hflip": Entry("HorizontalFlip"),
    "vflip": Entry("VerticalFlip"),
    "random_resized_crop": Entry(
        "RandomResizedCrop",
        {
            "area": Param(
                0.25, 0.0, 0.95, "the crop keeps an area fraction uniform in [1 - area, 1]"
            ),
            "ratio": Param(
                0.25, 0.0, 1.0, "aspect ratio log-uniform in [1 / (1 + ratio), 1 + ratio]"
            ),
        },
        {"scale": "area", "ratio": "ratio"},
    ),
    "crop_and_pad": Entry(
        "CropAndPad",
        {
            "percent": Param(
                0.1,
                0.0,
                0.45,
                "each side cropped (<0) or zero-padded (>0) by a fraction "
                "uniform in [-percent, percent], then resized back",
            ),
        },
        {"percent": "percent"},
    ),
    "brightness_contrast": Entry(
        "RandomBrightnessContrast",
        {
            "brightness": Param(
                0.2, 0.0, 1.0, "added brightness uniform in ±brightness of max value"
            ),
            "contrast": Param(
                0.2, 0.0, 1.0, "contrast factor uniform in [1 - contrast, 1 + contrast]"
            ),
        },
        {"brightness_limit": "brightness", "contrast_limit": "contrast"},
    ),
    "gauss_noise": Entry(
        "GaussNoise",
        {
            # No upper bound here: Albumentations' own schema checks std_range (a fraction ≤ 1).
            "std": Param(
                0.05, 0.0, float("inf"), "noise std uniform in [0, std], a fraction of 255"
            ),
        },
        {"std_range": "std"},
    ),
    "gaussian_blur": Entry(
        "GaussianBlur",
        {
            "sigma": Param(1.0, 0.0, 10.0, "blur std in pixels uniform in [0, sigma]"),
        },
        {"sigma_limit": "sigma"},
    ),
    "coarse_dropout": Entry(
        "CoarseDropout",
        {
            "holes": Param(
                1, 1, 16, "number of holes uniform in {1, ..., holes}", scaled=False, integer=True
            ),
            "size": Param(
                0.25,
                0.0,
                1.0,
                "hole side uniform in [size / 2, size] as a fraction of "
                "the image side; holes are filled with 0",
            ),
        },
        {"num_holes_range": "holes", "hole_height_range": "size", "hole_width_range": "size"},
    ),
    "elastic": Entry(
        "ElasticTransform",
        {
            "alpha": Param(1.0, 0.0, 5.0, "displacement scale as a fraction of the side"),
            "sigma": Param(
                0.15,
                0.01,
                1.0,
                "smoothing of the displacement field as a fraction of the side",
                scaled=False,
            ),
        },
        {"alpha": "alpha", "sigma": "sigma"},
    ),
}

PLACEHOLDER_SHAPE = (32, 32)
"""Image size used to check a spec before the data is known; every entry adapts to any size."""


def _albumentations() -> Any:
    # Albumentations asks the network for a newer release at import unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def resolve(spec: Augment) -> list[tuple[str, float, dict[str, float]]]:
    """The spec as (name, p, parameters with defaults filled and magnitudes scaled by strength)."""
    resolved = []
    for t in spec.transforms:
        entry = VOCABULARY[t.name]
        values = {k: float(t.params.get(k, param.default)) for k, param in entry.params.items()}
        for k, param in entry.params.items():
            values[k] *= spec.strength if param.scaled else 1.0
        resolved.append((t.name, t.p, values))
    return resolved


def _kwargs(name: str, v: dict[str, float], shape: tuple[int, int]) -> dict[str, Any]:
    """Entry parameters → the Albumentations constructor's arguments."""
    side = min(shape)
    border = {"border_mode": 0, "fill": 0}  # cv2.BORDER_CONSTANT: new pixels are black
    if name == "affine":
        return {
            "rotate": (-v["rotate"], v["rotate"]),
            "scale": (1 - v["scale"], 1 + v["scale"]),
            "translate_percent": (-v["translate"], v["translate"]),
            "shear": (-v["shear"], v["shear"]),
            **border,
        }
    if name == "random_resized_crop":
        return {
            "size": shape,
            "scale": (1 - v["area"], 1.0),
            "ratio": (1 / (1 + v["ratio"]), 1 + v["ratio"]),
        }
    if name == "crop_and_pad":
        return {"percent": (-v["percent"], v["percent"]), "keep_size": True, **border}
    if name == "brightness_contrast":
        return {
            "brightness_limit": (-v["brightness"], v["brightness"]),
            "contrast_limit": (-v["contrast"], v["contrast"]),
        }
    if name == "gauss_noise":
        return {"std_range": (0.0, v["std"])}
    if name == "gaussian_blur":
        # A zero sigma divides by zero in the kernel; a tiny one is the identity (1-tap kernel).
        low = 1e-3
        return {"sigma_limit": (low, max(v["sigma"], low)), "blur_limit": 0}
    if name == "coarse_dropout":
        hole = (v["size"] / 2, v["size"])
        return {
            "num_holes_range": (1, int(v["holes"])),
            "hole_height_range": hole,
            "hole_width_range": hole,
            "fill": 0,
        }
    if name == "elastic":
        return {"alpha": v["alpha"] * side, "sigma": v["sigma"] * side, **border}
    return {}


def _check_vocabulary(spec: Augment) -> None:
    for i, t in enumerate(spec.transforms):
        key = f"augment.transforms[{i}]"
        entry = VOCABULARY.get(t.name)
        if entry is None:
            raise ConfigError(
                f"{key}.name = {t.name!r}: unknown transform; allowed: {', '.join(VOCABULARY)}"
            )
        for k, value in t.params.items():
            param = entry.params.get(k)
            if param is None:
                allowed = ", ".join(entry.params) or "none (only p)"
                raise ConfigError(
                    f"{key}.params.{k}: unknown parameter of {t.name}; allowed: {allowed}"
                )
            if param.integer and value != int(value):
                raise ConfigError(f"{key}.params.{k} = {value!r}: must be a whole number")
            if not param.low <= value <= param.high:
                raise ConfigError(
                    f"{key}.params.{k} = {value!r}: outside [{param.low:g}, "
                    f"{param.high:g}] ({param.meaning})"
                )


def _build_one(
    i: int, name: str, p: float, values: dict[str, float], shape: tuple[int, int]
) -> Any:
    A = _albumentations()
    entry = VOCABULARY[name]
    try:
        # strict: an argument the class does not know is an error here, not a warning.
        return getattr(A, entry.albumentations)(**_kwargs(name, values, shape), p=p, strict=True)
    except ValueError as e:
        cause: Any = e.__cause__  # Albumentations wraps its pydantic ValidationError
        errors = cause.errors() if hasattr(cause, "errors") else []
        arg = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else ""
        where = "p" if arg == "p" else ""
        where = f"params.{entry.sources[arg]}" if arg in entry.sources else where
        got = f" {arg}={errors[0]['input']!r}" if errors and arg else ""
        message = errors[0]["msg"] if errors else str(e)
        raise ConfigError(
            f"augment.transforms[{i}].{where or 'params'}: {entry.albumentations} "
            f"rejects{got}: {message}"
        ) from None


def check_spec(spec: Augment) -> None:
    """Raise ConfigError naming the dotted key if any transform or argument is invalid."""
    _check_vocabulary(spec)
    for i, (name, p, values) in enumerate(resolve(spec)):
        _build_one(i, name, p, values, PLACEHOLDER_SHAPE)


def build_transforms(
    spec: Augment, train: bool, shape: tuple[int, int] = PLACEHOLDER_SHAPE, seed: int | None = None
) -> A.Compose:
    """The pipeline for images of `shape` (H, W): resize, then the random part when `train`.

    >>> build_transforms(config.augment, train=True, shape=(28, 28), seed=config.train.seed)
    """
    A = _albumentations()
    _check_vocabulary(spec)
    steps = [A.Resize(*shape)]
    if train:
        steps += [_build_one(i, *r, shape) for i, r in enumerate(resolve(spec))]
    return A.Compose(steps, seed=seed)


def apply(compose: A.Compose, image: np.ndarray) -> np.ndarray:
    """Run `compose` on one uint8 (C, H, W) image; returns (C, H, W) uint8."""
    import numpy as np

    out = compose(image=np.ascontiguousarray(image.transpose(1, 2, 0)))["image"]
    if out.ndim == 2:  # some OpenCV paths drop a single channel
        out = out[:, :, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def save_transforms(compose: A.Compose, path: Path) -> None:
    """Write the exact pipeline with Albumentations' own serializer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _albumentations().save(compose, str(path), data_format="json")


def load_transforms(path: Path) -> A.Compose:
    return _albumentations().load(str(path), data_format="json")


def preview_rows(
    x: np.ndarray, compose: A.Compose, n: int, draws: int, seed: int
) -> list[list[np.ndarray]]:
    """`n` images picked by `seed` from uint8 (N, C, H, W), each followed by `draws` draws."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))
    compose.set_random_seed(seed)
    return [[x[i], *(apply(compose, x[i]) for _ in range(draws))] for i in picks]


def write_preview(
    spec: Augment, x: np.ndarray, path: Path, n: int = 8, draws: int = 8, seed: int = 0
) -> Path:
    """A PNG grid of `n` training images with `draws` augmented draws each: what the model sees."""
    from cnnops.reports import plot_image_grid

    compose = build_transforms(spec, train=True, shape=x.shape[2:], seed=seed)
    title = f"augment: strength {spec.strength:g}; " + (
        ", ".join(t.name for t in spec.transforms) or "no transforms"
    )
    plot_image_grid(preview_rows(x, compose, n, draws, seed), path, title)
    return path
