"""DDP scaling: `cnnops train` of a ResNet at 224 px on 1 GPU against N GPUs, as a user runs it.

    python benchmarks/ddp_scaling.py --gpus 2            # on a machine with 2+ GPUs
    python benchmarks/ddp_scaling.py --gpus 2 --model resnet18 --n 4000

`--n` photo-like JPEGs (`cnnops demo-images`) prepared at 224 px once; then `python -m cnnops
train` with `train.devices` 1 and `--gpus`, `train.strategy: ddp`, bf16, channels_last, the
per-device batch `--batch-size` (so the global batch grows with the GPUs, as DDP does). Each
setting trains `--short` and `--long` epochs; the difference of the two runs' training seconds
is the steady state (start-up, the first epoch and the process launch cancel out):
images/s = (long - short) x training images / (seconds(long) - seconds(short)).
Prints images/s for each GPU count and the speed-up N GPUs / 1 GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from placement_speed import prepared_folder  # noqa: E402


def train_seconds(work: Path, args: argparse.Namespace, gpus: int, epochs: int) -> float:
    sets = {
        "model": json.dumps({"name": args.model}),
        "train.devices": str(gpus),
        "train.strategy": "ddp" if gpus > 1 else "auto",
        "train.accelerator": "gpu",
        "train.precision": "bf16-mixed",
        "train.batch_size": str(args.batch_size),
        "train.max_epochs": str(epochs),
        "train.early_stopping.enabled": "false",
        "train.scheduler.name": "none",
    }
    command = [sys.executable, "-m", "cnnops", "train"]
    for assignment in [*(f"{k}={v}" for k, v in sets.items()), *args.set]:
        command += ["--set", assignment]
    subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((work / "reports" / "train.json").read_text())
    shown = {k: report[k] for k in ("data_placement", "cuda_graphs", "best_val_acc")}
    print(f"  {gpus} GPU(s), {epochs} epochs: {report['train_seconds']} s {shown}", flush=True)
    return float(report["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--n", type=int, default=8000, help="images in the demo folder")
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], help="more KEY=VALUE overrides")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import torch

    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"cards: {cards}; {args.model}, {args.n} images at 224 px", flush=True)
    results: dict = {"cards": cards, "model": args.model, "n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, data = prepared_folder(work, args.n)
        n_train = len(data.y["train"])
        for gpus in sorted({1, args.gpus}):
            short = train_seconds(work, args, gpus, args.short)
            long = train_seconds(work, args, gpus, args.long)
            rate = (args.long - args.short) * n_train / (long - short)
            results[f"{gpus}_gpu_images_per_s"] = rate
            print(f"{gpus} GPU(s): {rate:9.1f} images/s ({short:.1f} s, {long:.1f} s)", flush=True)
    speedup = results[f"{args.gpus}_gpu_images_per_s"] / results["1_gpu_images_per_s"]
    results["speedup"] = speedup
    print(f"speed-up {args.gpus} GPUs / 1 GPU = {speedup:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
