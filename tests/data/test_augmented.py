"""Augmented training batches: reproducible from the seed whatever the number of workers."""

from __future__ import annotations

import numpy as np
import torch

from cnnops.config import Augment
from cnnops.data.datamodule import ImageData, TensorBatches
from cnnops.data.prepare import Prepared

AUGMENT = Augment(
    transforms=[
        {"name": "affine", "p": 0.8},
        {"name": "gauss_noise", "p": 0.5},
        {"name": "coarse_dropout", "p": 0.5},
    ]
)


def prepared(n: int = 96, shape: tuple[int, int, int] = (1, 8, 8)) -> Prepared:
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 256, (n, *shape), dtype=np.uint8) for s in ("train", "val", "test")}
    y = {s: rng.integers(0, 10, n).astype(np.int64) for s in ("train", "val", "test")}
    return Prepared(x, y, [str(i) for i in range(10)], [0.5] * shape[0], [0.25] * shape[0])


def epochs(data: ImageData, n: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    loader = data.train_dataloader()
    return [list(loader) for _ in range(n)]


def same(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=True)
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def test_same_seed_gives_identical_batches_with_two_workers() -> None:
    p = prepared()
    first = epochs(ImageData(p, 16, seed=5, augment=AUGMENT, num_workers=2))
    second = epochs(ImageData(p, 16, seed=5, augment=AUGMENT, num_workers=2))
    in_process = epochs(ImageData(p, 16, seed=5, augment=AUGMENT, num_workers=0))
    assert same(first[0], second[0]) and same(first[1], second[1])
    assert same(first[0], in_process[0]) and same(first[1], in_process[1])


def test_epochs_and_seeds_draw_differently() -> None:
    p = prepared()
    one, two = epochs(ImageData(p, 16, seed=5, augment=AUGMENT))
    other = epochs(ImageData(p, 16, seed=6, augment=AUGMENT), 1)[0]
    assert not same(one, two)
    assert not same(one, other)


def test_augmented_batches_are_uint8_chw_with_their_labels() -> None:
    p = prepared(shape=(3, 12, 10))
    x, y = next(iter(ImageData(p, 16, seed=0, augment=AUGMENT).train_dataloader()))
    assert x.shape == (16, 3, 12, 10) and x.dtype == torch.uint8
    assert y.dtype == torch.int64
    batches = epochs(ImageData(p, 16, 0, augment=AUGMENT), 1)[0]
    labels = sorted(int(v) for _, y in batches for v in y)
    assert labels == sorted(p.y["train"].tolist())


def test_no_transforms_keeps_the_resident_fast_path() -> None:
    data = ImageData(prepared(), 16, seed=0, augment=Augment())
    assert isinstance(data.train_dataloader(), TensorBatches)
    assert isinstance(ImageData(prepared(), 16, 0, augment=AUGMENT).val_dataloader(), TensorBatches)
