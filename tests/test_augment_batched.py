"""The batched on-device engine draws from the same distributions as the Albumentations engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnops.augment import apply, build_transforms, resolve
from cnnops.augment_batched import SUPPORTED, BatchAugment, supports
from cnnops.config import Augment, Transform

N = 1500
SIDE = 28


def engines(name: str, image: np.ndarray, p: float = 1.0, **params: float):
    """(Albumentations draws, batched draws) of one transform on N copies of `image` (C, H, W)."""
    spec = Augment(transforms=[Transform(name=name, p=p, params=params)])
    compose = build_transforms(spec, train=True, shape=image.shape[1:], seed=0)
    cpu = np.stack([apply(compose, image) for _ in range(N)]).astype(np.float64)
    batch = torch.from_numpy(np.repeat(image[None], N, axis=0))
    gpu = BatchAugment(resolve(spec), seed=0)(batch).numpy().astype(np.float64)
    return cpu, gpu


def blob(y: int, x: int) -> np.ndarray:
    image = np.zeros((1, SIDE, SIDE), np.uint8)
    image[0, y - 1 : y + 2, x - 1 : x + 2] = 255
    return image


def centroids(images: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[:SIDE, :SIDE]
    mass = images[:, 0].sum(axis=(1, 2))
    return np.stack(
        [(images[:, 0] * ys).sum(axis=(1, 2)) / mass, (images[:, 0] * xs).sum(axis=(1, 2)) / mass],
        1,
    )


def assert_same_distribution(a: np.ndarray, b: np.ndarray, atol: float, rtol: float = 0.12) -> None:
    assert abs(a.mean() - b.mean()) <= atol, (a.mean(), b.mean())
    assert b.std() == pytest.approx(a.std(), rel=rtol, abs=atol), (a.std(), b.std())


def test_translate_moves_content_by_the_same_amounts() -> None:
    cpu, gpu = engines("affine", blob(14, 14), rotate=0, scale=0, shear=0, translate=0.1)
    for axis in (0, 1):
        assert_same_distribution(centroids(cpu)[:, axis], centroids(gpu)[:, axis], atol=0.15)


def test_rotation_turns_content_by_the_same_angles() -> None:
    cpu, gpu = engines("affine", blob(6, 14), rotate=30, scale=0, shear=0, translate=0)
    # The angle of an off-centre blob about the image centre, in degrees; the sign convention
    # does not matter for a symmetric range.
    angle = [
        np.degrees(np.arctan2(c[:, 1] - 13.5, 13.5 - c[:, 0]))
        for c in (centroids(cpu), centroids(gpu))
    ]
    assert_same_distribution(angle[0], angle[1], atol=1.0)


def test_scale_changes_area_alike() -> None:
    square = np.zeros((1, SIDE, SIDE), np.uint8)
    square[0, 9:19, 9:19] = 255
    cpu, gpu = engines("affine", square, rotate=0, scale=0.2, shear=0, translate=0)
    assert_same_distribution(cpu.sum(axis=(1, 2, 3)) / 255, gpu.sum(axis=(1, 2, 3)) / 255, atol=3.0)


@pytest.mark.parametrize(("name", "axis"), [("hflip", 3), ("vflip", 2)])
def test_flips_happen_as_often(name: str, axis: int) -> None:
    image = blob(5, 5)
    cpu, gpu = engines(name, image, p=0.5)
    flipped = [(d != image).any(axis=(1, 2, 3)).mean() for d in (cpu, gpu)]
    assert flipped[0] == pytest.approx(0.5, abs=0.05) and flipped[1] == pytest.approx(0.5, abs=0.05)


def test_brightness_and_contrast_shift_pixel_values_alike() -> None:
    gray = np.full((1, SIDE, SIDE), 120, np.uint8)
    cpu, gpu = engines("brightness_contrast", gray, brightness=0.2, contrast=0.2)
    assert_same_distribution(cpu.mean(axis=(1, 2, 3)), gpu.mean(axis=(1, 2, 3)), atol=2.0)


def test_gaussian_noise_has_the_same_spread() -> None:
    gray = np.full((3, SIDE, SIDE), 128, np.uint8)
    cpu, gpu = engines("gauss_noise", gray, std=0.1)
    assert_same_distribution(cpu.std(axis=(1, 2, 3)), gpu.std(axis=(1, 2, 3)), atol=1.0)


def test_coarse_dropout_erases_the_same_share() -> None:
    white = np.full((1, SIDE, SIDE), 255, np.uint8)
    cpu, gpu = engines("coarse_dropout", white, holes=3, size=0.3)
    assert_same_distribution(
        (cpu == 0).mean(axis=(1, 2, 3)), (gpu < 1).mean(axis=(1, 2, 3)), atol=0.01, rtol=0.15
    )


def test_random_resized_crop_zooms_alike() -> None:
    ramp = np.tile(np.linspace(0, 255, SIDE, dtype=np.float64), (SIDE, 1))[None].astype(np.uint8)
    cpu, gpu = engines("random_resized_crop", ramp, area=0.5, ratio=0.25)
    # A crop of width w of a horizontal ramp spans w of its values: the spread measures the zoom.
    assert_same_distribution(cpu.std(axis=(1, 2, 3)), gpu.std(axis=(1, 2, 3)), atol=2.0, rtol=0.15)


def test_crop_and_pad_pads_the_same_share() -> None:
    white = np.full((1, SIDE, SIDE), 255, np.uint8)
    cpu, gpu = engines("crop_and_pad", white, percent=0.2)
    assert_same_distribution(
        (cpu < 128).mean(axis=(1, 2, 3)), (gpu < 128).mean(axis=(1, 2, 3)), atol=0.01, rtol=0.15
    )


def test_same_seed_same_batch_and_unsupported_entries_are_reported() -> None:
    spec = Augment(transforms=[Transform(name="affine", p=0.7), Transform(name="coarse_dropout")])
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    a, b = BatchAugment(resolve(spec), seed=3), BatchAugment(resolve(spec), seed=3)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), BatchAugment(resolve(spec), seed=4)(x))
    blur = Augment(transforms=[Transform(name="gaussian_blur")])
    assert not supports(resolve(blur)) and "gaussian_blur" not in SUPPORTED
    with pytest.raises(ValueError, match="gaussian_blur"):
        BatchAugment(resolve(blur))


def test_a_strength_per_image_draws_as_the_spec_resolved_at_that_strength() -> None:
    # Every entry the engine has, each magnitude on (holes are counts: strength leaves them).
    transforms = [
        Transform(
            name="affine",
            p=1.0,
            params={"rotate": 16, "scale": 0.25, "shear": 8, "translate": 0.25},
        ),
        Transform(name="random_resized_crop", p=1.0, params={"area": 0.5, "ratio": 0.5}),
        Transform(name="crop_and_pad", p=1.0, params={"percent": 0.25}),
        Transform(name="brightness_contrast", p=0.5, params={"brightness": 0.25, "contrast": 0.25}),
        Transform(name="gauss_noise", p=1.0, params={"std": 0.125}),
        Transform(name="coarse_dropout", p=1.0, params={"holes": 3, "size": 0.5}),
        Transform(name="hflip", p=0.5),
    ]
    x = torch.randint(0, 256, (64, 1, SIDE, SIDE), dtype=torch.uint8)
    at_half = BatchAugment(resolve(Augment(transforms=transforms, strength=0.5)), seed=3)(x)
    scaled = BatchAugment(resolve(Augment(transforms=transforms)), seed=3)(
        x, strength=torch.full((64,), 0.5)
    )
    torch.testing.assert_close(scaled, at_half, atol=1e-3, rtol=1e-4)
    unchanged = BatchAugment(resolve(Augment(transforms=transforms)), seed=3)(x)
    assert (unchanged - at_half).abs().mean() > 1  # strength really changed the draws
