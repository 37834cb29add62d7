"""How long a consumer waits for the champion: `mlflow.pyfunc.load_model` in a fresh process.

    make repro && python benchmarks/load_champion.py [--uri models:/NAME@champion] [--runs 5]

The store is MLFLOW_TRACKING_URI's, else params.yaml's `mlflow.tracking_uri` (a real server
works as well as the SQLite file). Each run is a new Python process, as a consumer's is: it
times `import mlflow.pyfunc`, then `load_model` (downloading, unpickling, imports made by the
model's code, rebuilding the network), then the first `predict` on the model's input example,
and says whether Lightning or torchvision got imported. Prints the medians as JSON; with
`--imports`, also the heaviest imports of one load (`python -X importtime`), in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
start = time.perf_counter()
import mlflow.pyfunc
imported = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
model.predict(model.input_example)
done = time.perf_counter()
print(json.dumps({
    "import_mlflow_s": imported - start,
    "load_model_s": loaded - imported,
    "first_predict_s": done - loaded,
    "lightning_imported": "lightning" in sys.modules,
    "torchvision_imported": "torchvision" in sys.modules,
}))
"""


def probe(uri: str, env: dict[str, str], flags: tuple[str, ...] = ()) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, *flags, "-c", PROBE, uri], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"loading {uri} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def heaviest_imports(importtime: str, top: int = 12) -> dict[str, float]:
    """Top-level and second-level imports by cumulative time, from `-X importtime` output."""
    found = {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        depth = len(name) - len(name.lstrip())
        if cumulative.strip().isdigit() and depth <= 3:
            found[name.strip()] = int(cumulative) / 1e6
    return dict(sorted(found.items(), key=lambda kv: -kv[1])[:top])


def default_uri() -> tuple[str, str]:
    from cnnops.config import load_config
    from cnnops.tracking import tracking_uri

    config = load_config(Path("params.yaml"))
    return f"models:/{config.registry.model_name}@champion", tracking_uri(config.mlflow)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uri", help="the model to load (default: params.yaml's @champion)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--imports", action="store_true", help="list the heaviest imports")
    args = parser.parse_args()
    store = os.environ.get("MLFLOW_TRACKING_URI")
    uri = args.uri
    if not (uri and store):
        default, store = default_uri()
        uri = uri or default
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "NO_ALBUMENTATIONS_UPDATE": "1"}
    probe(uri, env)  # warm-up: the disk cache, the artifact download cache
    runs = [probe(uri, env)[0] for _ in range(args.runs)]
    result: dict = {
        key: round(statistics.median(r[key] for r in runs), 3)
        for key in ("import_mlflow_s", "load_model_s", "first_predict_s")
    }
    result.update(
        {k: any(r[k] for r in runs) for k in ("lightning_imported", "torchvision_imported")},
        uri=uri,
        tracking_uri=store,
        runs=args.runs,
    )
    if args.imports:
        result["imports_s"] = heaviest_imports(probe(uri, env, ("-X", "importtime"))[1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
