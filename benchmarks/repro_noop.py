"""A no-op `dvc repro` against DVC's own check of the same pipeline, in an up-to-date checkout.

    make repro && python benchmarks/repro_noop.py [--runs 5] [--target dvc.yaml]

With nothing changed, `dvc repro` runs no stage: what it costs is DVC reading `dvc.yaml`,
`params.yaml` and `dvc.lock` and checking the dependencies' hashes. `dvc status` does the same
check without the repro machinery, so it is the baseline. Prints the median of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], runs: int, cwd: Path) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="an up-to-date checkout")
    parser.add_argument("--target", default="dvc.yaml", help="the pipeline file, as for dvc repro")
    args = parser.parse_args()
    beside = Path(sys.executable).with_name("dvc")  # the dvc of this environment, else PATH's
    dvc = str(beside) if beside.is_file() else shutil.which("dvc")
    if dvc is None:
        sys.exit("dvc not found: run this with the project's Python (.venv/bin/python)")
    status = subprocess.run(
        [dvc, "status", "--json", args.target],
        cwd=args.repo,
        capture_output=True,
        text=True,
        check=True,
    )
    if json.loads(status.stdout or "{}"):
        sys.exit(f"{args.target} is not up to date: run `dvc repro {args.target}` first")
    repro = timed([dvc, "repro", args.target], args.runs, args.repo)
    baseline = timed([dvc, "status", args.target], args.runs, args.repo)
    print(
        json.dumps(
            {
                "noop_repro_s": round(repro, 3),
                "dvc_status_s": round(baseline, 3),
                "ratio": round(repro / baseline, 2),
                "runs": args.runs,
            }
        )
    )


if __name__ == "__main__":
    main()
