"""Training batches for Lightning from one of three data placements, and the rule choosing one.

device  the split resident on the training device; batches drawn by index there (the fast path).
host    the split in host memory (pinned when training on CUDA); batches gathered on the host,
        then copied to the device asynchronously (Lightning moves pinned tensors non-blocking).
disk    the memory-mapped `.npy` arrays, read a whole batch at a time by threads reading ahead,
        into pinned memory, so memory use does not grow with the dataset.

All three draw the same batches in the same order for a seed (one `BatchIndices` plans them), so
a placement changes speed and memory, never the run. When the augmentation spec needs the
per-sample Albumentations engine, a DataLoader whose workers augment each sample reads the split
from host memory, or from the memory map for disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from cnnops.data.prepare import Prepared
from cnnops.errors import ConfigError

if TYPE_CHECKING:
    from cnnops.config import Augment

Placement = Literal["device", "host", "disk"]
Batch = tuple[torch.Tensor, torch.Tensor]


class BatchIndices(Sampler[torch.Tensor]):
    """The index batches of each epoch, shared by every placement so they all draw the same.

    A fresh permutation each epoch comes from `seed + epoch`, so runs repeat exactly. With
    `world_size > 1` each rank takes its own interleaved shard of the permutation.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_of: Callable[[], int] | None = None,
    ) -> None:
        self.n = n
        # Where the epoch number comes from (the trainer's), so a run resumed at epoch k draws
        # epoch k's permutation; without it, epochs are counted from 0 here.
        self.epoch_of = epoch_of
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = -(-self.n // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def next_epoch(self) -> torch.Tensor:
        """This rank's order of the epoch about to start (on the CPU); moves to the next epoch."""
        if self.epoch_of is not None:
            self.epoch = self.epoch_of()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        self.epoch += 1
        return idx[self.rank :: self.world_size]

    def split(self, idx: torch.Tensor) -> Iterator[torch.Tensor]:
        """An epoch's order (from `next_epoch`, on any device) cut into this sampler's batches."""
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield idx[start : start + self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.split(self.next_epoch())


class TensorBatches:
    """Iterates (x, y) batches drawn by index from tensors kept where they live (CPU or GPU).

    `pin`: gather each batch into pinned host memory, so its copy to the GPU runs asynchronously
    (the host placement); the tensors themselves then live in (pinned) host memory.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batches: BatchIndices, pin: bool = False
    ) -> None:
        self.x, self.y, self.batches, self.pin = x, y, batches, pin

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        # One copy of the epoch's order to the data's device, not one per batch.
        idx = self.batches.next_epoch().to(self.y.device)
        for i in self.batches.split(idx):
            yield (self._gather(self.x, i), self._gather(self.y, i))

    def _gather(self, t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return t[i]
        out = torch.empty((len(i), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, i, out=out)


class MappedArray:
    """A memory-mapped `.npy` array that pickles as its file name, not its contents: worker
    processes started by spawn or forkserver reopen the map instead of receiving a copy."""

    def __init__(self, array: np.memmap) -> None:
        self.filename, self.shape = str(array.filename), array.shape
        self._array: np.ndarray | None = array

    @staticmethod
    def wrap(array: np.ndarray) -> np.ndarray | MappedArray:
        """`array` itself unless it is a whole memory-mapped `.npy` file (not a slice of one)."""
        if not isinstance(array, np.memmap) or not array.filename:
            return array
        try:
            reopened = np.load(array.filename, mmap_mode="r")
        except (OSError, ValueError):  # a raw map, not an .npy file: it travels as it is
            return array
        same = (reopened.shape, reopened.dtype) == (array.shape, array.dtype)
        return MappedArray(array) if same else array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.filename, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[key]

    def __len__(self) -> int:
        return self.shape[0]


class MappedBatches:
    """Whole batches gathered from a (memory-mapped) uint8 array by one `np.take` each, straight
    into (pinned) tensor memory: the copy runs with the GIL released and on one core, so a few
    reader threads work in parallel without crowding the training thread, while the kernel
    pages rows in from its cache or the disk (each row is one contiguous stretch of the file)."""

    def __init__(self, x: np.ndarray | MappedArray, y: np.ndarray, pin: bool = False) -> None:
        self.x, self.y, self.pin = x, y, pin

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        array = np.asarray(self.x.array if isinstance(self.x, MappedArray) else self.x)
        rows = idx.numpy()
        out = torch.empty((len(rows), *array.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        np.take(array, rows, axis=0, out=out.numpy(), mode="clip")  # "clip": no buffered copy
        y = torch.from_numpy(self.y[rows])
        return out, y.pin_memory() if self.pin else y


class DiskBatches:
    """Batches of `MappedBatches` read ahead of training by two threads of this process (the
    copies release the GIL), so nothing is pickled between processes. Two keep a ResNet-18 on
    an H100 fed at the host placement's rate; four measured slower, crowding the training
    thread (benchmarks/placement_speed.py).

    Not a DataLoader: Lightning would wrap the sampler in a distributed one, sharding
    batches that `BatchIndices` has already sharded by rank.
    """

    AHEAD = 6

    def __init__(self, data: MappedBatches, batches: BatchIndices, threads: int = 2) -> None:
        self.data, self.batches, self.threads = data, batches, threads

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cnnops-disk")
        pending: deque[Future[Batch]] = deque()
        try:
            for idx in self.batches:
                pending.append(pool.submit(self.data.__getitem__, idx))
                if len(pending) > self.AHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of data can live on `device` leaving most of its memory to the model."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free // 4


def fits_host(nbytes: int) -> bool:
    """Whether `nbytes` fit in host memory leaving half of what is available to everything else
    (the model, workers' buffers, the page cache the other splits are read through)."""
    import psutil

    return nbytes < psutil.virtual_memory().available // 2


def choose_placement(requested: str, nbytes: int, device: torch.device) -> Placement:
    """The placement of a split of `nbytes` for training on `device`: `requested` unless it is
    auto, which takes the first that fits of device, host and disk. On a CPU the device is the
    host, so auto there means host (or disk when the split would crowd the memory)."""
    if requested in ("device", "host", "disk"):
        return requested  # type: ignore[return-value]
    if device.type != "cpu" and fits(nbytes, device):
        return "device"
    return "host" if fits_host(nbytes) else "disk"


def check_placement(requested: str, device_type: str) -> None:
    """A forced placement that cannot work on a `device_type` ("cpu", "cuda", "mps") device is a
    ConfigError, raised before training starts."""
    if requested == "device" and device_type == "cpu":
        raise ConfigError(
            "train.data_placement = 'device': training runs on the CPU (no GPU, or "
            "train.accelerator: cpu); use auto, host or disk"
        )


class ImageData(L.LightningDataModule):
    """Serves the prepared splits, each from the placement `placement` (auto, device, host or
    disk) resolves to; `placements` records the choice per split once a loader was made.

    `device`: the training device when used without a Trainer (a Trainer's own device wins).
    """

    def __init__(
        self,
        prepared: Prepared,
        batch_size: int,
        seed: int,
        eval_batch_size: int = 512,
        augment: Augment | None = None,
        num_workers: int = 0,
        placement: str = "auto",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.prepared = prepared
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.augment, self.num_workers = augment, num_workers
        self.placement, self._device = placement, device
        self.placements: dict[str, Placement] = {}
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return self._device or torch.device("cpu")

    def placement_of(self, name: str) -> Placement:
        if name not in self.placements:
            nbytes = self.prepared.x[name].nbytes
            self.placements[name] = choose_placement(self.placement, nbytes, self.device)
        return self.placements[name]

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split as tensors on the device (device placement) or in host memory (host)."""
        if name not in self._tensors:
            x_np, y = self.prepared.x[name], torch.from_numpy(self.prepared.y[name])
            if self.placement_of(name) == "device":
                x = torch.from_numpy(x_np.copy()).to(self.device)
                y = y.to(self.device)
            elif self._pin:
                # Read once, straight into pinned memory (no second copy of a large split).
                x = torch.empty(x_np.shape, dtype=torch.uint8, pin_memory=True)
                x.numpy()[...] = x_np
                y = y.pin_memory()
            else:
                x = torch.from_numpy(x_np.copy())
            self._tensors[name] = (x, y)
        return self._tensors[name]

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _batches(
        self, name: str, batch: int, shuffle: bool, world: bool
    ) -> TensorBatches | DiskBatches:
        """The split's batches from its placement; `world`: this rank's shard of them."""
        rank, size = self._rank() if world else (0, 1)
        plan: dict[str, Any] = {"shuffle": shuffle, "rank": rank, "world_size": size}
        if shuffle:
            plan.update(
                seed=self.seed,
                drop_last=size > 1,
                epoch_of=lambda: self.trainer.current_epoch if self.trainer else 0,
            )
        batches = BatchIndices(len(self.prepared.y[name]), batch, **plan)
        if self.placement_of(name) == "disk":
            data = MappedBatches(self._array(name), self.prepared.y[name], pin=self._pin)
            return DiskBatches(data, batches)
        pin = self.placement_of(name) == "host" and self._pin
        return TensorBatches(*self._split(name), batches, pin=pin)

    def _array(self, name: str) -> np.ndarray | MappedArray:
        return MappedArray.wrap(self.prepared.x[name])

    def train_dataloader(self) -> TensorBatches | DiskBatches | DataLoader:
        if self.augment is not None and self.augment.transforms:
            return self._augmented()
        return self._batches("train", self.batch_size, shuffle=True, world=True)

    def _augmented(self) -> DataLoader:
        """Per-sample augmentation in workers on the CPU: the split stays in host memory (a
        device placement means host here), or on disk for disk."""
        from cnnops.augment import build_transforms
        from cnnops.data.augmented import augmented_loader

        assert self.augment is not None
        if self.placement_of("train") == "disk":
            x: Any = self._array("train")
        else:
            self.placements["train"] = "host"
            x = self.prepared.x["train"]
            if isinstance(x, np.memmap):
                x = np.array(x)  # read into memory once
        y = self.prepared.y["train"]
        compose = build_transforms(self.augment, train=True, shape=x.shape[2:], seed=self.seed)
        return augmented_loader(x, y, compose, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> TensorBatches | DiskBatches:
        return self._batches("val", self.eval_batch_size, shuffle=False, world=True)

    def test_dataloader(self) -> TensorBatches | DiskBatches:
        return self._batches("test", self.eval_batch_size, shuffle=False, world=False)
