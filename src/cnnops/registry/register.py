"""`cnnops register`: the best candidate checkpoint becomes a new version, alias challenger."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from cnnops.checkpoints import load_classifier, sha256_file
from cnnops.errors import DataError
from cnnops.registry.model import (
    ImageClassifier,
    check_images,
    expected_input,
    image_shape,
    requirements,
    signature,
)
from cnnops.registry.store import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_SHA256,
    ORIGIN_RUN_ID,
    connect,
    version_by_alias,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cnnops.config import Config
    from cnnops.module import Classifier


@dataclass(frozen=True)
class Candidate:
    name: str
    checkpoint: Path
    run: dict[str, Any]


def find_candidates(models: Path, names: list[str]) -> list[Candidate]:
    """Every `models/<name>/` holding both best.ckpt and run.json (a missing tune run is normal)."""
    found = []
    for name in names:
        checkpoint, run = models / name / "best.ckpt", models / name / "run.json"
        if checkpoint.is_file() and run.is_file():
            found.append(Candidate(name, checkpoint, json.loads(run.read_text())))
    return found


def pick(candidates: list[Candidate], select_by: str) -> Candidate:
    """The candidate with the best validation metric `select_by` (val_acc higher, val_loss lower).

    A tie on it (equal to 9 decimal places, e.g. val_acc 1.0 and 1.0) goes to the better value of
    the other validation metric: the lower val_loss when selecting by val_acc, the higher val_acc
    when selecting by val_loss; a candidate that lacks it loses the tie. When both metrics tie,
    the earlier candidate in `registry.candidates` (train before tune) wins.
    """
    key = f"best_{select_by}"
    scored = [c for c in candidates if _number(c.run.get(key)) is not None]
    if not scored:
        names = [str(c.checkpoint.parent) for c in candidates] or ["none found"]
        raise DataError(
            f"no candidate with {key} in its run.json ({', '.join(names)}); "
            "run `cnnops train` first"
        )
    other = "val_loss" if select_by == "val_acc" else "val_acc"

    def rank(c: Candidate) -> tuple[float, float]:
        # Both made "higher is better"; a missing tie-breaker ranks below every real value.
        ranks = []
        for metric in (select_by, other):
            value = _number(c.run.get(f"best_{metric}"))
            sign = 1.0 if metric.endswith("acc") else -1.0
            ranks.append(-math.inf if value is None else round(sign * value, 9))
        return ranks[0], ranks[1]

    return max(scored, key=rank)  # max keeps the first of equal ranks


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _provenance(config: Config, candidate: Candidate, sha256: str) -> dict[str, str]:
    """Where the checkpoint came from: tags on the version, and on a run that register creates."""
    from cnnops import tracking

    return {
        "cnnops.candidate": candidate.name,
        ORIGIN_RUN_ID: str(candidate.run.get("mlflow_run_id")),
        CHECKPOINT_SHA256: sha256,
        "git.commit": tracking.git_commit(),
        **tracking.dvc_hashes([config.paths.prepared, candidate.checkpoint.parent]),
    }


def _version_tags(
    config: Config, candidate: Candidate, model: Classifier, run_id: str, provenance: dict[str, str]
) -> dict[str, str]:
    hp = model.hparams
    tags = {
        **provenance,
        "cnnops.run_id": run_id,
        "cnnops.select_by": config.registry.select_by,
        "val_acc": str(candidate.run.get("best_val_acc")),
        "val_loss": str(candidate.run.get("best_val_loss")),
        "classes": json.dumps(list(hp["classes"])),
        "preprocessing": json.dumps(
            {
                "input": "uint8 NCHW, 0..255",
                "scale": 1 / 255,
                "mean": list(hp["mean"]),
                "std": list(hp["std"]),
            }
        ),
        "params": json.dumps({"model": hp["model"], "train": hp["train"]}, sort_keys=True)[:5000],
    }
    if "params" in candidate.run:
        tags["cnnops.tuned_params"] = json.dumps(candidate.run["params"], sort_keys=True)[:5000]
    return tags


def _log_model(candidate: Candidate, model: Classifier, example: np.ndarray) -> Any:
    hp = model.hparams
    metadata = {
        "classes": list(hp["classes"]),
        "mean": list(hp["mean"]),
        "std": list(hp["std"]),
        "input": expected_input(image_shape(model)),
        "output": "class probabilities (N, K)",
    }
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ImageClassifier(),
        artifacts={"checkpoint": str(candidate.checkpoint)},
        signature=signature(len(hp["classes"])),
        input_example=example,
        pip_requirements=requirements(),
        metadata=metadata,
    )


def register(config: Config) -> dict[str, Any]:
    """`cnnops register`: the best candidate becomes a new model version, alias challenger.

    The version is logged into the candidate's own training run when the tracking store holds
    it, so it links to its curves and params. A store that does not (a clone of the project,
    whose checkpoints came through DVC and whose mlflow.db is its own) gets a new run,
    `register-<candidate>`, carrying the checkpoint's provenance: the original run id
    (`cnnops.origin_run_id`), git commit, dvc.lock hashes and the checkpoint's SHA-256.
    """
    from mlflow.exceptions import MlflowException

    from cnnops import tracking
    from cnnops.data import prepare

    paths, name = config.paths, config.registry.model_name
    candidate = pick(
        find_candidates(paths.models, config.registry.candidates), config.registry.select_by
    )
    sha256 = sha256_file(candidate.checkpoint)
    model = load_classifier(candidate.checkpoint)
    example = np.ascontiguousarray(prepare.load(paths.prepared).x["test"][:2])
    check_images(example, model)
    client = connect(config.mlflow)
    provenance = _provenance(config, candidate, sha256)
    run_id = _existing_run(client, candidate) or _provenance_run(
        config, candidate, model, provenance
    )
    tags = _version_tags(config, candidate, model, run_id, provenance)
    with tracking.fluent(config.mlflow):
        with mlflow.start_run(run_id=run_id):
            info = _log_model(candidate, model, example)
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    try:
        previous = version_by_alias(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    except (MlflowException, OSError):
        client.delete_model_version(name, version.version)  # nothing half-registered
        raise
    pointer = {
        "model_name": name,
        "version": int(version.version),
        "run_id": run_id,
        "origin_run_id": provenance[ORIGIN_RUN_ID],
        "candidate": candidate.name,
        "checkpoint_sha256": sha256,
        "model_uri": f"models:/{name}/{version.version}",
        "aliases": {
            CHALLENGER: int(version.version),
            CHAMPION: int(previous.version) if previous else None,
        },
    }
    from cnnops import reports

    reports.write_json(paths.models / "registry.json", pointer)
    return pointer


def _existing_run(client: MlflowClient, candidate: Candidate) -> str | None:
    """The candidate's training run, if this tracking store holds it (and it is not deleted)."""
    from mlflow.exceptions import MlflowException

    run_id = candidate.run.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(str(run_id))
    except MlflowException:
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def _provenance_run(
    config: Config, candidate: Candidate, model: Classifier, provenance: dict[str, str]
) -> str:
    """A new run for a checkpoint whose training run this store lacks: its provenance as tags,
    the resolved config it was trained with as params, its run.json numbers as metrics."""
    from cnnops import tracking
    from cnnops.config import flatten

    with tracking.MlflowTracker(
        config.mlflow,
        run_name=f"register-{candidate.name}",
        tags={"cnnops.stage": "register", **provenance},
    ) as tracker:
        tracker.log_params(flatten(dict(model.hparams.get("config") or {})))
        tracker.log_metrics(candidate.run, step=int(candidate.run.get("epochs_run") or 0))
    return str(tracker.run_id)
