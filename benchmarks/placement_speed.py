"""Training speed from an image folder at 224 px: the typical stack against the data placements.

    python benchmarks/placement_speed.py --n 20000 --steps 200 --batch-size 256   # GPU
    python benchmarks/placement_speed.py --n 64 --steps 3 --batch-size 16 --device cpu

Builds a synthetic folder of 256 px JPEGs (`synthetic.make_folder`), prepares it at 224 px with
`cnnops fetch` and `cnnops prepare`, then trains the same torchvision resnet18 (random init,
10 classes, SGD, bf16 autocast on CUDA) for `--steps` steps in this one process from:
  typical  torchvision ImageFolder + DataLoader workers: PIL decode, Resize(224),
           RandomHorizontalFlip, ToTensor, Normalize per sample, pinned memory;
  disk     the disk placement: the prepared uint8 arrays memory-mapped, whole batches read
           ahead by threads into pinned memory; flip and normalization batched on the device;
  host     the host placement: the prepared split in pinned memory, batches copied
           asynchronously; the same batched flip and normalization.
Warm-up steps are excluded; every variant runs `--rounds` times, its best counts. Prints
images/s of each and the ratios disk/typical and disk/host.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import make_folder  # noqa: E402

from cnnops.data import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
Batch = tuple[torch.Tensor, torch.Tensor]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepared_folder(work: Path, n: int) -> tuple[Path, prepare.Prepared]:
    """`n` synthetic JPEGs under work/images, prepared at 224 px the way a user would."""
    from ruamel.yaml import YAML

    from cnnops.config import apply_override, read_params

    images = make_folder(work / "images", n, side=256)
    params = read_params(ROOT / "params.yaml")
    for assignment in (
        "fetch.source=imagefolder",
        f"fetch.url={images}",
        f"prepare.image_size={SIZE}",
    ):
        apply_override(params, assignment)
    stream = io.StringIO()
    YAML(typ="safe", pure=True).dump(params, stream)
    (work / "params.yaml").write_text(stream.getvalue())
    for stage in ("fetch", "prepare"):
        subprocess.run(
            [sys.executable, "-m", "cnnops", stage], cwd=work, check=True, stdout=subprocess.DEVNULL
        )
    return images, prepare.load(work / "data" / "prepared", mmap=True)


def endless(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Epoch after epoch, so every variant runs the same number of steps whatever the size."""
    while True:
        yield from loader


def images_per_s(
    name: str,
    loader: Iterable[Batch],
    prep: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    args: argparse.Namespace,
) -> float:
    """Steady-state training throughput of `model` (a fresh copy) on batches of `loader`."""
    device = args.device
    model = copy.deepcopy(model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = endless(loader)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(prep(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    rate = args.steps * args.batch_size / (time.perf_counter() - start)
    print(f"{name:8s} {rate:10.1f} images/s", flush=True)
    return rate


def typical_loader(images: Path, data: prepare.Prepared, args: argparse.Namespace):
    """What a user writes by hand: decode and transform each image in DataLoader workers."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(SIZE),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(data.mean, data.std),
        ]
    )
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(str(images), transform=transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=args.device.type == "cuda",
        drop_last=True,
        persistent_workers=args.workers > 0,
    )


def batched_flip_normalize(data: prepare.Prepared, device: torch.device):
    """cnnops' on-device augmentation engine (a random horizontal flip), then normalization:
    what the LightningModule does to every uint8 batch that reaches it."""
    from cnnops.augment import resolve
    from cnnops.augment_batched import BatchAugment
    from cnnops.config import Augment, Transform

    flip = BatchAugment(resolve(Augment(transforms=[Transform(name="hflip", p=0.5)])))
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1) * 255

    def prep(x: torch.Tensor) -> torch.Tensor:
        return (flip(x) - mean) / std

    return prep


def placement_loader(
    data: prepare.Prepared, placement: str, args: argparse.Namespace, threads: int = 0
):
    from cnnops.data.datamodule import ImageData

    module = ImageData(data, args.batch_size, seed=0, placement=placement, device=args.device)
    loader = module.train_dataloader()
    if threads:
        loader.threads = threads  # the disk placement's reader threads
    return loader


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000, help="images in the synthetic folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    parser.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="untimed steps first (default: one epoch, so every variant reads warm files: the "
        "JPEGs for the typical stack, the memory map for disk)",
    )
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers"
    )
    parser.add_argument("--rounds", type=int, default=2, help="each variant's best of these")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--keep", type=Path, help="build the folder here and leave it")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.device.type == "cuda"
    card = (
        torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else f"CPU x{torch.get_num_threads()}"
    )
    from torchvision.models import resnet18

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        images, data = prepared_folder(work, args.n)
        if args.warmup < 0:
            args.warmup = len(data.y["train"]) // args.batch_size
        print(
            f"device: {card}; {args.n} images ({len(data.y['train'])} in the training split) "
            f"at {SIZE} px, batch {args.batch_size}, {args.steps} steps after {args.warmup}, "
            f"{args.workers} workers, torch {torch.__version__}",
            flush=True,
        )
        torch.manual_seed(0)
        model = resnet18(num_classes=10)
        prep = batched_flip_normalize(data, args.device)
        variants = {
            "typical": lambda: (typical_loader(images, data, args), lambda x: x),
            "disk": lambda: (placement_loader(data, "disk", args), prep),
            "disk-4t": lambda: (placement_loader(data, "disk", args, threads=4), prep),
            "host": lambda: (placement_loader(data, "host", args), prep),
        }
        rates: dict[str, float] = {}
        for _ in range(args.rounds):  # the best of the rounds: order effects wash out
            for name, make in variants.items():
                loader, transform = make()
                rate = images_per_s(name, loader, transform, model, args)
                rates[name] = max(rates.get(name, 0.0), rate)
    print(f"\n{'variant':8s} {'images/s':>10s}   ({card})")
    for name, rate in rates.items():
        print(f"{name:8s} {rate:10.1f}")
    print(f"disk / typical: {rates['disk'] / rates['typical']:.2f}x")
    print(f"disk / host:    {rates['disk'] / rates['host']:.2f}x")


if __name__ == "__main__":
    main()
