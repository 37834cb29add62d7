"""A study on several GPUs: `cnnops tune --workers W` with trials of `--devices` GPUs each.

    python benchmarks/multi_gpu_study.py --workers 4                 # 4 single-GPU trials at once
    python benchmarks/multi_gpu_study.py --workers 2 --devices 2     # two 2-GPU DDP trials at once

MNIST (the files under $CNNOPS_MNIST_MIRROR, else the embedded digits), the seed CNN, pruning on.
Prints how the trials ended, the best value, the wall time, and how many trials ran at once
(the most whose start-to-end intervals overlap): W workers on W x devices GPUs should show W.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
ROOT = Path(__file__).resolve().parent.parent


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one instant."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = best = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        best = max(best, running)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1, help="GPUs per trial (DDP when > 1)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--set", action="append", default=[], help="more KEY=VALUE overrides")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import optuna

    from cnnops import studies
    from cnnops.config import load_config

    mirror = os.environ.get("CNNOPS_MNIST_MIRROR")
    params = ROOT / ("pipelines/mnist/params.yaml" if mirror else "params.yaml")
    sets = [
        f"fetch.mirror={mirror}" if mirror else "fetch.source=digits",
        "paths.src=src",
        f"train.accelerator={args.accelerator}",
        f"train.precision={'bf16-mixed' if args.accelerator == 'gpu' else '32-true'}",
        f"train.devices={args.devices}",
        f"train.strategy={'ddp' if args.devices > 1 else 'auto'}",
        f"train.max_epochs={args.epochs}",
        f"tune.n_trials={args.trials}",
        "tune.pruner.startup_trials=2",
        "tune.pruner.warmup_epochs=1",
        *args.set,
    ]
    command = [sys.executable, "-m", "cnnops"]
    options = [a for s in sets for a in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(params.read_text())
        for stage in ("fetch", "prepare"):
            subprocess.run(
                [*command, stage, *options], cwd=work, check=True, stdout=subprocess.DEVNULL
            )
        started = time.perf_counter()
        subprocess.run(
            [*command, "tune", "--workers", str(args.workers), *options],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        config = load_config(work / "params.yaml", sets)
        url = studies.storage_url(config)
        storage = studies.open_storage(url if studies.is_rdb(url) else str(work / url), print)
        name = studies.study_name(config, work / config.paths.prepared)
        study = optuna.load_study(study_name=name, storage=storage)
        trials, best = study.trials, study.best_value
    intervals = [
        (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        for t in trials
        if t.datetime_start and t.datetime_complete
    ]
    results = {
        "workers": args.workers,
        "devices_per_trial": args.devices,
        "states": dict(Counter(t.state.name.lower() for t in trials)),
        "best_value": best,
        "epochs_per_trial": [len(t.intermediate_values) for t in trials],
        "most_trials_at_once": most_at_once(intervals),
        "tune_seconds": round(wall, 1),
    }
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
