"""Fine-tuning on a GPU: `cnnops train` of ResNet-50 at 224 px against a plain loop, and
pretrained against from-scratch accuracy at an equal budget.

    python benchmarks/transfer_speed.py --weights-dir .cache/weights                  # GPU
    python benchmarks/transfer_speed.py --n 64 --epochs 2 --batch-size 8 --device cpu

Data: `--n` photo-like JPEGs (digits on random colours, `cnnops demo-images`), prepared at
224 px by `cnnops fetch` and `cnnops prepare`, in one process per run of this script.
  speed     ResNet-50 at 224x224, bf16 autocast, channels_last, AdamW, `--batch-size`: the
            steady-state training images/s (epochs after the first, validation off the clock)
            of `cnnops.train.train()` and of a plain loop over the same split resident on the
            device (uint8, standardized per batch). Target: cnnops >= 0.95x the loop.
  accuracy  every architecture with a torchvision file `<name>-*.pth` in `--weights-dir`
            (MobileNetV2 from `make install`): fine-tuned (head alone for the first epoch,
            then everything, backbone at lr x 0.1) and trained from scratch, with the same
            epochs (`--acc-epochs`), batch size, learning rate and data, on `--few` training
            images and on all of them; the best validation accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from placement_speed import prepared_folder  # noqa: E402

from cnnops.config import Config, load_config  # noqa: E402
from cnnops.data.prepare import Prepared  # noqa: E402
from cnnops.models.zoo import torchvision_net  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steady(name: str, times: list[float], n: int) -> float:
    rest = times[1:] or times
    rate = n * len(rest) / sum(rest)
    print(f"{name:14s} {rate:9.1f} images/s  (epochs {', '.join(f'{t:.2f}' for t in times)} s)")
    return rate


def config(args: argparse.Namespace, model: dict, **train: object) -> Config:
    overrides = [
        f"model={json.dumps(model)}",
        f"train.max_epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.precision=" + ("bf16-mixed" if args.device.type == "cuda" else "32-true"),
        "train.accelerator=" + ("gpu" if args.device.type == "cuda" else "cpu"),
        "train.early_stopping.enabled=false",
        "augment.transforms=[]",
        *(f"train.{k}={json.dumps(v)}" for k, v in train.items()),
    ]
    return load_config(ROOT / "pipelines/transfer/params.yaml", overrides)


class Clock(Callback):
    """Training seconds per epoch, validation excluded."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_train_epoch_start(self, trainer, module) -> None:
        sync(self.device)
        self.start, self.paused = time.perf_counter(), 0.0

    def on_validation_epoch_start(self, trainer, module) -> None:
        sync(self.device)
        self.val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module) -> None:
        sync(self.device)
        self.paused += time.perf_counter() - self.val_start

    def on_train_epoch_end(self, trainer, module) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self.start - self.paused)


def cnnops_run(cfg: Config, data: Prepared, device: torch.device) -> tuple[list[float], dict]:
    from cnnops.train import quiet_lightning, train

    quiet_lightning()
    clock = Clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, data, Path(tmp), callbacks=[clock])
    return clock.times, result.metrics


def plain_loop(data: Prepared, args: argparse.Namespace) -> list[float]:
    """ResNet-50 trained the plain way: resident uint8 split, per-batch standardization, bf16
    autocast, channels_last, fused AdamW."""
    device = args.device
    torch.manual_seed(0)
    x = torch.from_numpy(np.array(data.x["train"])).to(device)
    y = torch.from_numpy(data.y["train"][:]).to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1) * 255
    model = torchvision_net("resnet50", num_classes=len(data.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
    steps = len(y) // args.batch_size
    times = []
    for _ in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(y), device=device)
        for i in range(steps):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            xb = ((x[idx].float() - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def few(data: Prepared, n: int) -> Prepared:
    """`data` with a random `n` of its training images (validation untouched)."""
    if n >= len(data.y["train"]):
        return data
    keep = np.sort(np.random.default_rng(0).choice(len(data.y["train"]), n, replace=False))
    x, y = dict(data.x), dict(data.y)
    x["train"], y["train"] = np.asarray(data.x["train"][keep]), data.y["train"][keep]
    return Prepared(x, y, data.classes, data.mean, data.std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6000, help="images in the demo folder")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--few", type=int, default=500, help="training images of the small run")
    parser.add_argument("--acc-epochs", type=int, default=8, help="epochs of each accuracy run")
    parser.add_argument("--acc-batch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--weights-dir", type=Path, default=ROOT / ".cache/weights")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(auto if args.device == "auto" else args.device)
    card = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    print(f"device: {card}; {args.n} images at 224 px; {args.epochs} epochs", flush=True)
    results: dict = {"device": card, "n": args.n, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        _, data = prepared_folder(Path(tmp), args.n)
        n = len(data.y["train"]) // args.batch_size * args.batch_size

        print("speed: ResNet-50, 224x224, bf16, channels_last", flush=True)
        plain = steady("plain loop", plain_loop(data, args), n)
        times, metrics = cnnops_run(config(args, {"name": "resnet50"}), data, args.device)
        ours = steady("cnnops train", times, len(data.y["train"]))
        print(f"cnnops / plain = {ours / plain:.3f}  (cuda_graphs: {metrics['cuda_graphs']})")
        results["speed"] = {"plain": plain, "cnnops": ours, "ratio": ours / plain}

        print("accuracy: pretrained against scratch, equal budget", flush=True)
        results["accuracy"] = {}
        for name in ("mobilenet_v2", "resnet50", "efficientnet_b0", "resnet18", "vgg16"):
            files = sorted(args.weights_dir.glob(f"{name}-*.pth"))
            if not files:
                print(f"{name:16s} no {name}-*.pth in {args.weights_dir}: skipped")
                continue
            pretrained = {
                "name": name,
                "weights": str(files[0]),
                "freeze": "backbone",
                "unfreeze_epoch": 1,
            }
            budget = argparse.Namespace(
                **{**vars(args), "epochs": args.acc_epochs, "batch_size": args.acc_batch_size}
            )
            tuned = config(budget, pretrained, optimizer={"lr": 1e-3, "backbone_lr_mult": 0.1})
            scratch = config(budget, {"name": name}, optimizer={"lr": 1e-3})
            for subset in (args.few, len(data.y["train"])):
                part = few(data, subset)
                accs = {}
                for label, cfg in (("pretrained", tuned), ("scratch", scratch)):
                    accs[label] = cnnops_run(cfg, part, args.device)[1]["best_val_acc"]
                print(
                    f"{name:16s} {subset:6d} training images: pretrained "
                    f"{accs['pretrained']:.4f}  scratch {accs['scratch']:.4f}",
                    flush=True,
                )
                results["accuracy"][f"{name}@{subset}"] = accs
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
