"""Epochs of K trials trained at once (`tune.trials_at_once`) against one trial alone, in one process.

    python benchmarks/trials_at_once.py --mirror DIR                     # GPU: full MNIST
    python benchmarks/trials_at_once.py --mirror DIR --k 1 2 --size 1024 --epochs 2   # a check on the CPU

In a scratch folder with the MNIST pipeline's params (batch 512, bf16, translate augmentation,
no pruning, no early stopping): for each K, K trials of one study start together and train
`--epochs` epochs side by side, as `cnnops tune` trains them, and for K > 1 also eagerly
(`train.cuda_graphs: false`). Prints each setting's epoch times, its steady-state trial-images/s
(the fastest epoch after the first, which captures and warms up) and its ratio to K = 1.
With `--profile`, its last epoch runs under `torch.profiler`: how long the GPU was busy (the
union of its kernels' spans), their summed time (more than busy when trials overlap), and the
kernels that took the most.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import optuna
import torch

from cnnops import fused, studies, tune
from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.data.prepare import Prepared
from cnnops.data.sources import fetch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "paths.src=src/cnnops",  # the pipeline's params point two folders up; here it is one
    "train.batch_size=512",
    "train.precision=bf16-mixed",
    "train.early_stopping.enabled=false",
    "tune.metric=val_acc",
    "tune.pruner.name=none",
    "augment.transforms=[{name: affine, p: 1.0, params: {rotate: 0, scale: 0, translate: 0.08}}]",
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_time(events: list) -> tuple[float, float]:
    """Seconds the GPU was busy (the union of the kernels' spans) and the kernels' summed time."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, current = 0.0, None
    for start, end in spans:
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        busy += current[1] - current[0]
    return busy / 1e6, sum(e.device_time for e in events) / 1e6


def epochs_at_once(
    folder: Path, data: Prepared, k: int, graphs: str, epochs: int, profile: bool = False
) -> dict[str, object]:
    """Epoch seconds of `k` trials started together and trained `epochs` epochs."""
    name = f"k{k}-graphs-{graphs}"
    config = load_config(
        folder / "params.yaml",
        [
            *SETTINGS,
            f"train.max_epochs={epochs + 1}",  # none ends within the measured epochs
            f"tune.trials_at_once={k}",
            f"tune.n_trials={k}",
            f"train.cuda_graphs={graphs}",
            f"tune.study_name={name}",
        ],
    )
    job = tune.Job(config, name, studies.storage_url(config))
    study = tune.open_study(job)
    run = fused.Fused(study, job, data)
    run.slots = [run._start(tune._next_trial(study, job)) for _ in range(k)]  # type: ignore[arg-type]
    seconds, profiled = [], None
    for epoch in range(epochs):
        sync()
        watch = profile and epoch == epochs - 1
        with torch.profiler.profile(activities=_activities()) if watch else nullcontext() as prof:
            start = time.perf_counter()
            run._epoch()
            sync()
            seconds.append(time.perf_counter() - start)
        if watch:
            profiled = prof
    for slot in list(run.slots):
        run.slots.remove(slot)
        run._finish(slot, "complete")
    steady = min(seconds[1:] or seconds)
    row: dict[str, object] = {
        "k": k,
        "cuda_graphs": graphs,
        "epoch_s": [round(s, 3) for s in seconds],
        "trial_images_per_s": round(k * len(data.y["train"]) / steady),
    }
    if profiled is not None:
        kernels = [e for e in profiled.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if kernels:
            busy, summed = gpu_time(kernels)
            row |= {"gpu_busy_s": round(busy, 3), "kernel_s": round(summed, 3)}
        sort = "device_time_total" if kernels else "cpu_time_total"
        print(profiled.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return row


def _activities() -> list[torch.profiler.ProfilerActivity]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", required=True, help="an MNIST mirror folder")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, help="the first N images of each split only")
    parser.add_argument("--profile", action="store_true", help="profile each setting's last epoch")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mirror = Path(args.mirror).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        params = (ROOT / "pipelines" / "mnist" / "params.yaml").read_text()
        (folder / "params.yaml").write_text(params)
        base = load_config(folder / "params.yaml", [*SETTINGS, f"fetch.mirror={mirror}"])
        fetch(base.fetch, base.paths.raw)
        prepare.prepare(base, base.paths.raw, base.paths.prepared, base.paths.reports / "data.json")
        data = prepare.load(base.paths.prepared)
        if args.size:
            for split in ("train", "val"):
                data.x[split], data.y[split] = (
                    data.x[split][: args.size],
                    data.y[split][: args.size],
                )
        rows = []
        for k in args.k:
            for graphs in ("auto", "false") if k > 1 else ("auto",):
                rows.append(epochs_at_once(folder, data, k, graphs, args.epochs, args.profile))
                alone = rows[0]["trial_images_per_s"]
                rows[-1]["vs_one_trial"] = round(rows[-1]["trial_images_per_s"] / alone, 2)  # type: ignore[operator]
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": _device(), "rows": rows}, indent=2))


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
