"""Batches for Lightning: index-drawn from resident uint8 tensors (the fast path), or, when the
augmentation spec has transforms, a DataLoader whose workers augment each training sample."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import lightning as L
import torch

from cnnops.data.prepare import Prepared

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from cnnops.config import Augment


class TensorBatches:
    """Iterates (x, y) batches drawn by index from tensors kept where they live (CPU or GPU).

    A fresh permutation each epoch comes from `seed + epoch`, so runs repeat exactly. With
    `world_size > 1` each rank takes its own interleaved shard of the permutation.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_of: Callable[[], int] | None = None,
    ) -> None:
        self.x, self.y = x, y
        # Where the epoch number comes from (the trainer's), so a run resumed at epoch k draws
        # epoch k's permutation; without it, epochs are counted from 0 here.
        self.epoch_of = epoch_of
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        return idx[self.rank :: self.world_size].to(self.y.device)

    def __len__(self) -> int:
        n = -(-len(self.y) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.epoch_of is not None:
            self.epoch = self.epoch_of()
        idx = self._indices()
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            i = idx[start : start + self.batch_size]
            yield self.x[i], self.y[i]


def fits(x: torch.Tensor, device: torch.device) -> bool:
    """Whether `x` can live on `device` leaving most of its memory to the model."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return x.nbytes < free // 4


class ImageData(L.LightningDataModule):
    """Serves the prepared splits, put on the training device once when they fit there."""

    def __init__(
        self,
        prepared: Prepared,
        batch_size: int,
        seed: int,
        eval_batch_size: int = 512,
        augment: Augment | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.prepared = prepared
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.augment, self.num_workers = augment, num_workers
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._tensors:
            x = torch.from_numpy(self.prepared.x[name].copy())
            y = torch.from_numpy(self.prepared.y[name])
            device = self.trainer.strategy.root_device if self.trainer is not None else None
            if device is not None and fits(x, device):
                x, y = x.to(device), y.to(device)
            self._tensors[name] = (x, y)
        return self._tensors[name]

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> TensorBatches | DataLoader:
        if self.augment is not None and self.augment.transforms:
            return self._augmented()
        rank, world = self._rank()
        return TensorBatches(
            *self._split("train"),
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=world > 1,
            epoch_of=lambda: self.trainer.current_epoch if self.trainer else 0,
        )

    def _augmented(self) -> DataLoader:
        from cnnops.augment import build_transforms
        from cnnops.data.augmented import augmented_loader

        assert self.augment is not None
        x, y = self.prepared.x["train"], self.prepared.y["train"]
        compose = build_transforms(self.augment, train=True, shape=x.shape[2:], seed=self.seed)
        return augmented_loader(x, y, compose, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> TensorBatches:
        rank, world = self._rank()
        return TensorBatches(
            *self._split("val"), self.eval_batch_size, shuffle=False, rank=rank, world_size=world
        )

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(*self._split("test"), self.eval_batch_size, shuffle=False)
