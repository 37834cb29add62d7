"""Preparing an image folder at scale: images/s and peak memory for growing folders.

    python benchmarks/prepare_scale.py                    # N = 2,000 and 20,000
    python benchmarks/prepare_scale.py --sizes 500 2000   # quicker

For each N, a synthetic folder of N RGB JPEGs at 256x256 (`benchmarks/synthetic.py`, made here:
no download) is fetched and prepared at 224 by the real `cnnops fetch` and `cnnops prepare`,
each prepare in a fresh process. Prints images/s, the peak memory of the prepare process and its
decoding workers together (summed PSS, sampled), and the ratio of the peaks at the largest N to the smallest (the
target: within 1.3x, and below 2 GiB). Then adds `--add` images to the largest folder and
prepares again: only those are decoded (the rest come from the content-hash cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic import make_folder  # noqa: E402


def run(project: Path, *args: str) -> tuple[float, float, str]:
    """Run `cnnops *args` in `project`; its seconds, the peak memory of it and its worker
    processes together (the sum of their proportional set sizes, so pages they share count
    once; sampled every 20 ms), in MiB, and its stderr."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    cnnops = Path(sys.executable).with_name("cnnops")
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(cnnops), *args], cwd=project, env=env, stderr=err)
        peak = 0
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(parent))
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        sys.exit(f"cnnops {' '.join(args)} failed:\n{stderr[-2000:]}")
    return elapsed, peak / 2**20, stderr


def _tree_rss(parent: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for proc in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().pss
    return total


def prepare(project: Path, sets: list[str]) -> dict:
    seconds, peak, err = run(project, "prepare", *sets)
    counts = re.search(r"(\d+) images: (\d+) decoded, (\d+) from the cache", err)
    assert counts, err
    return {
        "images": int(counts.group(1)),
        "decoded": int(counts.group(2)),
        "cached": int(counts.group(3)),
        "seconds": round(seconds, 1),
        "images_per_s": round(int(counts.group(1)) / seconds, 1),
        "peak_mib": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as tmp:
        for n in args.sizes:
            project = Path(tmp) / f"n{n}"
            project.mkdir()
            shutil.copy(ROOT / "params.yaml", project / "params.yaml")
            folder = make_folder(project / "images", n)
            sets = [
                *("--set", "fetch.source=imagefolder", "--set", f"fetch.url={folder}"),
                *("--set", f"prepare.image_size={args.image_size}"),
                *("--set", f"prepare.workers={args.workers}"),
            ]
            run(project, "fetch", *sets)
            rows.append({"case": f"N={n}", **prepare(project, sets)})
        make_folder(folder, args.add, start=args.sizes[-1])
        run(project, "fetch", *sets)
        rows.append({"case": f"N={args.sizes[-1]} + {args.add} new", **prepare(project, sets)})
    print(f"{'case':<22}{'images/s':>10}{'seconds':>9}{'peak MiB':>14}{'decoded':>9}{'cached':>8}")
    for r in rows:
        print(
            f"{r['case']:<22}{r['images_per_s']:>10}{r['seconds']:>9}{r['peak_mib']:>14}"
            f"{r['decoded']:>9}{r['cached']:>8}"
        )
    small, large = rows[0], rows[len(args.sizes) - 1]
    ratio = large["peak_mib"] / small["peak_mib"]
    print(f"peak memory ratio {large['case']} / {small['case']}: {ratio:.2f} (target <= 1.3)")
    print(json.dumps({"rows": rows, "peak_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
