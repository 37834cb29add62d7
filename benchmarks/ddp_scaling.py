"""DDP scaling: `cnnops train` of a ResNet at 224 px on 1 GPU against N GPUs, as a user runs it.

    python benchmarks/ddp_scaling.py --gpus 2 4          # on a machine with 4 GPUs
    python benchmarks/ddp_scaling.py --gpus 2 --model resnet18 --n 4000 --eager

`--n` photo-like JPEGs (`cnnops demo-images`) prepared at 224 px once; then `python -m cnnops
train` with `train.devices` 1 and each of `--gpus`, `train.strategy: ddp`, bf16, channels_last,
the per-device batch `--batch-size` (the global batch grows with the GPUs, as DDP does).
Throughput is the steady state: training images / the median `epoch_seconds` of the epochs
after the first (an epoch's training and validation; start-up, the first epoch's warm-up and
checkpoint writes left out). The process's whole wall time is printed beside it. `--eager` also
times 1 GPU with CUDA graphs off (DDP steps run eagerly): graphs' share of the 1-GPU number.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from placement_speed import prepared_folder  # noqa: E402


def train_rate(work: Path, args: argparse.Namespace, gpus: int, *extra: str) -> dict:
    sets = {
        "model": json.dumps({"name": args.model}),
        "train.devices": str(gpus),
        "train.strategy": "ddp" if gpus > 1 else "auto",
        "train.accelerator": "gpu",
        "train.precision": "bf16-mixed",
        "train.batch_size": str(args.batch_size),
        "train.max_epochs": str(args.epochs),
        "train.early_stopping.enabled": "false",
        "train.scheduler.name": "none",
    }
    command = [sys.executable, "-m", "cnnops", "train"]
    for assignment in [*(f"{k}={v}" for k, v in sets.items()), *args.set, *extra]:
        command += ["--set", assignment]
    started = time.perf_counter()
    subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads((work / "reports" / "train.json").read_text())
    with (work / "reports" / "train_curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    seconds = [float(row["epoch_seconds"]) for row in rows]
    return {
        "images_per_s": args.n_train / statistics.median(seconds[1:]),
        "epoch_seconds": seconds,
        "val_acc": [float(row["val_acc"]) for row in rows],
        "train_loss": [float(row["train_loss"]) for row in rows],
        "process_seconds": round(wall, 1),
        **{k: report[k] for k in ("data_placement", "cuda_graphs", "best_val_acc")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2])
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--n", type=int, default=8000, help="images in the demo folder")
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--eager", action="store_true", help="also 1 GPU with CUDA graphs off")
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
        args.n_train = len(data.y["train"])
        runs = {"1": train_rate(work, args, 1)}
        if args.eager:
            runs["1 eager"] = train_rate(work, args, 1, "train.cuda_graphs=false")
        for gpus in args.gpus:
            runs[str(gpus)] = train_rate(work, args, gpus)
    base = runs["1"]["images_per_s"]
    for name, run in runs.items():
        run["speedup"] = round(run["images_per_s"] / base, 3)
        print(
            f"{name:>8} GPU(s): {run['images_per_s']:8.1f} images/s  {run['speedup']:.2f}x"
            f"  (process {run['process_seconds']} s, graphs {run['cuda_graphs']},"
            f" placement {run['data_placement']}, val_acc by epoch {run['val_acc']})",
            flush=True,
        )
    results["runs"] = runs
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
