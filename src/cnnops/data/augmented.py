"""Training batches augmented per sample by Albumentations in DataLoader workers.

Every sample draws its randomness from its own generator seeded by (run seed, epoch, index), so a
batch depends on neither the number of workers nor which worker made it: the same seed gives the
same batches with `num_workers` 0 or 2, and each epoch sees fresh draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cnnops.augment import apply


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): a fresh permutation per epoch from `seed + epoch`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch, so a resumed run draws that epoch's order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        epoch, self.epoch = self.epoch, self.epoch + 1
        for i in torch.randperm(self.n, generator=g).tolist():
            yield epoch, i


class AugmentedImages(Dataset):
    """uint8 (N, C, H, W) images through an Albumentations `Compose`, seeded per (epoch, index)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, compose: object, seed: int) -> None:
        self.x, self.y, self.compose, self.seed = x, y, compose, seed

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        # Global seeds do not reach a Compose's own generators, and forked workers would share them.
        seeds = np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, i])
        py_random = random.Random(int(seeds.generate_state(1)[0]))
        self.compose.set_random_state(np.random.default_rng(seeds), py_random)  # type: ignore[attr-defined]
        image = apply(self.compose, self.x[i])  # type: ignore[arg-type]
        return torch.from_numpy(image), int(self.y[i])


def augmented_loader(
    x: np.ndarray, y: np.ndarray, compose: object, batch_size: int, seed: int, num_workers: int
) -> DataLoader:
    """A DataLoader of augmented uint8 batches; normalization happens on the device."""
    return DataLoader(
        AugmentedImages(x, y, compose, seed),
        batch_size=batch_size,
        sampler=EpochSampler(len(y), seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
