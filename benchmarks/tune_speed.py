"""Tuning that fills the device: a study on MNIST against the time of one training run.

    python benchmarks/tune_speed.py --mirror DIR --workers 4 --trials 50
    python benchmarks/tune_speed.py --mirror DIR --workers 1 --trials-at-once 8

Runs, as a user would, in a scratch folder with the MNIST pipeline's params: `cnnops fetch`,
`cnnops prepare`, `cnnops train` twice (timed, process start to exit; the second, warm, is the
baseline), then `cnnops tune --workers N`
(timed), each worker training `--trials-at-once` trials together (`tune.trials_at_once`).
Prints where the study's seconds went (its phases, CNNOPS_TIMINGS: a phase entered once per
trial or epoch adds up), both times and their ratio, the best validation accuracy, how many trials were
pruned, the trial epochs run, the span from the first trial's start to the last one's end,
and the most trials that ran at once (from their start times and durations).

    python benchmarks/tune_speed.py --mirror DIR --workers 1 --trials-at-once 10 --against OLD/src

`--against` also times the study with another source tree of cnnops (`git archive REV src | tar
-x -C OLD`): each tune runs in a fresh copy of the same prepared folder, alternated, this tree
first, `--rounds` times each, and the table shows both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from cnnops.timings import seconds_by_phase

ROOT = Path(__file__).resolve().parents[1]


def most_at_once(rows: list[dict[str, str]]) -> int:
    events = []
    for r in rows:
        if r["started"] and r["duration_s"]:
            start = datetime.fromisoformat(r["started"])
            events += [(start, 1), (start + timedelta(seconds=float(r["duration_s"])), -1)]
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def study_span(rows: list[dict[str, str]]) -> float:
    """Seconds from the first trial's start to the last one's end: the study without the
    process's start-up and reports."""
    spans = [
        (
            start := datetime.fromisoformat(r["started"]),
            start + timedelta(seconds=float(r["duration_s"])),
        )
        for r in rows
        if r["started"] and r["duration_s"]
    ]
    if not spans:
        return 0.0
    return (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--trials-at-once", type=int, default=1)
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="more KEY=VALUE overrides"
    )
    parser.add_argument("--against", type=Path, help="another cnnops source tree (holding cnnops/)")
    parser.add_argument("--rounds", type=int, default=2, help="tunes of each tree, with --against")
    args = parser.parse_args()
    overrides = [
        f"fetch.mirror={Path(args.mirror).resolve()}",
        "paths.src=src/cnnops",  # the pipeline's params point two folders up; here it is one
        f"train.max_epochs={args.epochs}",
        "train.batch_size=512",
        "train.precision=bf16-mixed",
        "tune.metric=val_acc",
        f"tune.n_trials={args.trials}",
        f"tune.trials_at_once={args.trials_at_once}",
        "augment.transforms=[{name: affine, p: 1.0, params: {rotate: 0, scale: 0, translate: 0.08}}]",
        *args.extra,
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "cnnops"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        (Path(tmp) / "params.yaml").write_text((ROOT / "pipelines/mnist/params.yaml").read_text())

        def run(*stage: str, cwd: Path = Path(tmp), **more_env: str) -> float:
            start = time.perf_counter()
            subprocess.run([*cmd, *stage, *sets], cwd=cwd, env={**env, **more_env}, check=True)
            return time.perf_counter() - start

        run("fetch")
        run("prepare")
        first_train_s = run("train")  # the first process on a machine warms its file caches
        train_s = run("train")
        trees = {"this": None}
        if args.against:
            trees["against"] = str(args.against.resolve())
        results = []
        for i in range(args.rounds if args.against else 1):
            for name, tree in trees.items():
                results.append(
                    {"tree": name, **tune_once(run, Path(tmp), f"{name}-{i}", tree, args.workers)}
                )
    for result in results:
        print(f"{'cnnops tune (' + result['tree'] + '), phase (s)':<32}{'':>9}")
        for name, seconds in result.pop("phases").items():
            print(f"{name:<32}{seconds:9.2f}")
    for result in results:
        print(
            json.dumps(
                {
                    "first_train_s": round(first_train_s, 1),
                    "train_s": round(train_s, 1),
                    **result,
                    "ratio": round(result["tune_s"] / train_s, 2),
                    "workers": args.workers,
                    "trials_at_once": args.trials_at_once,
                },
                indent=2,
            )
        )


def tune_once(run, folder: Path, name: str, tree: str | None, workers: int) -> dict:
    """`cnnops tune` in a fresh copy of the prepared `folder` (cnnops from `tree` when given):
    its seconds, phases and outcome."""
    copy = folder / "tunes" / name
    shutil.copytree(
        folder, copy, ignore=shutil.ignore_patterns("tunes", "mlflow.db", "mlartifacts")
    )
    timings, spawned = copy / "timings.json", time.time()
    env = {"CNNOPS_TIMINGS": str(timings), "MLFLOW_TRACKING_URI": f"sqlite:///{copy}/mlflow.db"}
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))
    tune_s = run("tune", "--workers", str(workers), cwd=copy, **env)
    summary = json.loads((copy / "reports/tune/tune.json").read_text())
    with (copy / "reports/tune/trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {
        "tune_s": round(tune_s, 1),
        "phases": seconds_by_phase(timings, spawned),
        "trials": len(rows),
        "complete": summary["complete"],
        "pruned": summary["pruned"],
        "failed": summary["failed"],
        "best_val_acc": summary["best_val_acc"],
        "most_trials_at_once": most_at_once(rows),
        "trial_epochs": sum(int(r["epochs"] or 0) for r in rows),
        "study_s": round(study_span(rows), 1),
    }


if __name__ == "__main__":
    main()
