"""Data placements (device, host, disk): the same batches for a seed, and training from disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnops.data import prepare
from cnnops.data.datamodule import DiskBatches, ImageData, TensorBatches, choose_placement
from tests.conftest import cnnops
from tests.data.test_augmented import AUGMENT, same
from tests.data.test_augmented import prepared as synthetic

PLACEMENTS = ("device", "host", "disk")
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def mapped(tmp_path: Path) -> prepare.Prepared:
    """100 images per split saved as the prepare stage does, then opened memory-mapped."""
    prepare.save(synthetic(n=100, shape=(3, 8, 8)), tmp_path / "prepared")
    data = prepare.load(tmp_path / "prepared", mmap=True)
    assert isinstance(data.x["train"], np.memmap)
    return data


def trainer_at(rank: int, world: int, device: str = "cpu") -> SimpleNamespace:
    """What ImageData reads of a Trainer: the rank, the world and the epoch about to run."""
    strategy = SimpleNamespace(root_device=torch.device(device))
    return SimpleNamespace(strategy=strategy, global_rank=rank, world_size=world, current_epoch=0)


def draws(data: ImageData, split: str = "train", epochs: int = 2) -> list[Batches]:
    """Each epoch's batches (on the CPU), the epoch taken from the trainer as Lightning sets it."""
    loader = getattr(data, f"{split}_dataloader")()
    out = []
    for epoch in range(epochs):
        if data.trainer is not None:
            data.trainer.current_epoch = epoch
        out.append([(x.cpu(), y.cpu()) for x, y in loader])
    return out


def placed(p: prepare.Prepared, placement: str, rank: int, world: int, **kw) -> ImageData:
    device = kw.pop("device", "cpu")
    data = ImageData(p, 16, seed=3, eval_batch_size=24, placement=placement, **kw)
    data.trainer = trainer_at(rank, world, device)  # type: ignore[assignment]
    return data


@pytest.mark.parametrize("world", [1, 2])
def test_every_placement_draws_the_same_batches(mapped: prepare.Prepared, world: int) -> None:
    for rank in range(world):
        runs = {name: draws(placed(mapped, name, rank, world)) for name in PLACEMENTS}
        first, second = runs["device"]
        assert not same(first, second)  # a fresh order each epoch: the comparison can fail
        assert len(first) == (3 if world == 2 else 7)  # 50 a rank: drop_last with several
        for name in ("host", "disk"):
            assert all(map(same, runs[name], runs["device"])), f"{name}, rank {rank} of {world}"
        for split in ("val", "test"):
            evals = [draws(placed(mapped, name, rank, world), split, 1) for name in PLACEMENTS]
            assert all(same(e[0], evals[0][0]) for e in evals[1:]), split


def test_ranks_split_each_epoch_between_them(mapped: prepare.Prepared) -> None:
    ranks = [draws(placed(mapped, "disk", rank, 2), epochs=1)[0] for rank in (0, 1)]
    labels = [torch.cat([y for _, y in batches]) for batches in ranks]
    images = [torch.cat([x for x, _ in batches]) for batches in ranks]
    assert len(labels[0]) == len(labels[1]) == 48
    flat = torch.cat(images).flatten(1)
    assert len(torch.unique(flat, dim=0)) == 96  # no image drawn twice across the ranks


def test_disk_batches_come_in_order_however_many_threads_read(mapped: prepare.Prepared) -> None:
    threads = placed(mapped, "disk", 0, 1)
    loader = threads.train_dataloader()
    assert isinstance(loader, DiskBatches)
    assert isinstance(placed(mapped, "host", 0, 1).train_dataloader(), TensorBatches)
    one = DiskBatches(loader.data, loader.batches, threads=1)
    a = draws(threads)
    b = []
    for epoch in range(2):  # the same two epochs, read by a single thread
        threads.trainer.current_epoch = epoch
        b.append(list(one))
    assert all(map(same, a, b))
    # Batch order, not file order: rows come back where the permutation put them.
    x, y = a[0][0]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:16].numpy()
    assert np.array_equal(x.numpy(), mapped.x["train"][order])
    assert np.array_equal(y.numpy(), mapped.y["train"][order])


def test_albumentations_reads_the_memory_map_for_disk(mapped: prepare.Prepared) -> None:
    disk = ImageData(mapped, 16, seed=5, augment=AUGMENT, num_workers=2, placement="disk")
    host = ImageData(mapped, 16, seed=5, augment=AUGMENT, placement="host")
    a, b = draws(disk), draws(host)
    assert all(map(same, a, b))
    assert disk.placements["train"] == "disk" and host.placements["train"] == "host"


def test_auto_takes_the_first_placement_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnops.data import datamodule

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_placement("auto", 10, cpu) == "host"  # on a CPU the device is the host
    assert choose_placement("disk", 10, cpu) == "disk"
    monkeypatch.setattr(datamodule, "fits", lambda nbytes, device: nbytes < 100)
    assert choose_placement("auto", 10, cuda) == "device"
    assert choose_placement("auto", 1000, cuda) == "host"
    monkeypatch.setattr(datamodule, "fits_host", lambda nbytes: False)
    assert choose_placement("auto", 1000, cuda) == "disk"
    assert choose_placement("auto", 1000, cpu) == "disk"


def test_training_from_disk_takes_the_same_steps(workdir: Path) -> None:
    from cnnops.checkpoints import load_checkpoint
    from cnnops.config import load_config
    from cnnops.data.sources import fetch
    from cnnops.train import train, train_stage

    config = load_config(workdir / "params.yaml", ["train.max_epochs=1"])
    fetch(config.fetch, config.paths.raw)
    prepare.prepare(config, config.paths.raw, config.paths.prepared, workdir / "data.json")
    train_stage(
        load_config(workdir / "params.yaml", ["train.max_epochs=1", "train.data_placement=disk"])
    )
    report = json.loads((workdir / "reports/train.json").read_text())
    assert report["data_placement"] == "disk" and report["epochs_run"] == 1
    assert math.isfinite(report["best_val_loss"])
    curves = (workdir / "reports/train_curves.csv").read_text().splitlines()
    train_loss = float(curves[1].split(",")[1])
    assert math.isfinite(train_loss) and train_loss > 0
    disk_steps = load_checkpoint(workdir / "models/train/last.ckpt")["global_step"]

    default = train(config, prepare.load(config.paths.prepared), workdir / "default")
    assert default.metrics["data_placement"] == "host"  # auto on a CPU
    assert load_checkpoint(default.last_checkpoint)["global_step"] == disk_steps > 0
    # The same batches, so the same run: only where the data came from differs.
    assert default.metrics["best_val_loss"] == pytest.approx(report["best_val_loss"], abs=1e-4)

    from mlflow import MlflowClient

    run_id = json.loads((workdir / "models/train/run.json").read_text())["mlflow_run_id"]
    assert MlflowClient().get_run(run_id).data.tags["cnnops.data_placement"] == "disk"


def test_device_placement_on_a_cpu_run_is_one_line_naming_the_key(workdir: Path) -> None:
    sets = ["--set", "train.accelerator=cpu", "--set", "train.data_placement=device"]
    result = cnnops("train", *sets)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "train.data_placement = 'device'" in lines[0] and "host or disk" in lines[0]
    assert not (workdir / "models").exists() and not (workdir / "reports").exists()


@pytest.mark.gpu
def test_on_a_gpu_every_placement_draws_the_same_batches(mapped: prepare.Prepared) -> None:
    ways = [("device", 0), ("host", 0), ("disk", 0), ("disk", 2)]
    runs = [draws(placed(mapped, name, 0, 1, device="cuda", num_workers=w)) for name, w in ways]
    assert all(all(map(same, run, runs[0])) for run in runs[1:])
    host = placed(mapped, "host", 0, 1, device="cuda")
    x, y = next(iter(host.train_dataloader()))
    assert x.is_pinned() and y.is_pinned()  # copied to the GPU without blocking
    device = placed(mapped, "device", 0, 1, device="cuda")
    assert next(iter(device.train_dataloader()))[0].is_cuda
