"""What the user waits for in `cnnops train`, phase by phase, against the import floor.

    python benchmarks/startup.py                         # embedded digits (CPU or GPU)
    python benchmarks/startup.py --mirror DIR --epochs 5 # MNIST from a local mirror
    python benchmarks/startup.py --importtime            # also the slowest imports

In a scratch project: `cnnops fetch` and `cnnops prepare`, then `cnnops train` `--runs` times, each
a new process, timed from spawn to exit. The first run creates the MLflow store (first run); the
others find it (warm). The floor is `python -c "import torch, lightning"`, timed in the same run.
Each train run writes its phases (CNNOPS_TIMINGS): the table shows where the seconds went, and the
summary checks the targets: warm <= fit + floor + 2 s, first <= that + 4 s; `cnnops --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnops.timings import seconds_by_phase

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_once(cmd: list[str], cwd: str, env: dict[str, str]) -> dict[str, object]:
    """One `cnnops train`: wall seconds, the fit's seconds and each phase's seconds."""
    timings = Path(cwd) / "timings.json"
    spawned = time.time()
    wall = timed(cmd, cwd, {**env, "CNNOPS_TIMINGS": str(timings)})
    phases = seconds_by_phase(timings, spawned)
    fit = json.loads((Path(cwd) / "reports" / "train.json").read_text())["train_seconds"]
    return {"wall": wall, "fit": fit, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", help="an MNIST mirror folder: train on MNIST, not digits")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="train runs: one first, then warm")
    parser.add_argument("--importtime", action="store_true", help="print the slowest imports")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    params = ROOT / ("pipelines/mnist/params.yaml" if args.mirror else "params.yaml")
    overrides = [f"train.max_epochs={args.epochs}", *args.extra]
    if args.mirror:
        # The pipeline's params point at the code from two folders down; here it is one project.
        overrides += [f"fetch.mirror={Path(args.mirror).resolve()}", "paths.src=src/cnnops"]
    sets = [a for o in overrides for a in ("--set", o)]
    cnnops = [sys.executable, "-m", "cnnops"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(params.read_text())
        timed([*cnnops, "fetch", *sets], tmp, env)
        timed([*cnnops, "prepare", *sets], tmp, env)
        floors = [
            timed([sys.executable, "-c", "import torch, lightning"], tmp, env) for _ in range(3)
        ]
        help_s = min(timed([*cnnops, "--help"], tmp, env) for _ in range(3))
        runs = [train_once([*cnnops, "train", *sets], tmp, env) for _ in range(args.runs)]
        if args.importtime:
            slowest_imports([*cnnops, "train", *sets], tmp, env)
    report(runs, statistics.median(floors), help_s)


def report(runs: list[dict], floor: float, help_s: float) -> None:
    names = list(dict.fromkeys(name for r in runs for name in r["phases"]))
    print(
        f"{'phase (s)':<28}"
        + "".join(f"{'first' if i == 0 else 'warm':>9}" for i in range(len(runs)))
    )
    for name in names:
        row = "".join(f"{r['phases'].get(name, 0.0):9.2f}" for r in runs)
        print(f"{name:<28}{row}")
    print(f"{'wall':<28}" + "".join(f"{r['wall']:9.2f}" for r in runs))
    first, warm = runs[0], runs[1:] or runs
    warm_wall = statistics.median(r["wall"] for r in warm)
    warm_fit = statistics.median(r["fit"] for r in warm)
    target = warm_fit + floor + 2
    summary = {
        "import_floor_s": round(floor, 2),
        "fit_s": round(warm_fit, 2),
        "train_warm_s": round(warm_wall, 2),
        "train_first_s": round(first["wall"], 2),
        "target_warm_s": round(target, 2),
        "target_first_s": round(first["fit"] + floor + 2 + 4, 2),
        "overhead_beyond_floor_and_fit_s": round(warm_wall - warm_fit - floor, 2),
        "warm_met": warm_wall <= target,
        "first_met": first["wall"] <= first["fit"] + floor + 6,
        "help_s": round(help_s, 3),
        "help_met": help_s <= 0.3,
    }
    print(json.dumps(summary, indent=2))


def slowest_imports(cmd: list[str], cwd: str, env: dict[str, str], top: int = 15) -> None:
    """`python -X importtime` of one train run: the top-level imports by cumulative time."""
    done = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True
    )
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if not name.startswith("  ") and cumulative.strip().isdigit():
                rows.append((int(cumulative) / 1e6, name.strip()))
    print("slowest top-level imports (s, cumulative):")
    for seconds, name in sorted(rows, reverse=True)[:top]:
        print(f"  {seconds:6.2f}  {name}")


if __name__ == "__main__":
    main()
