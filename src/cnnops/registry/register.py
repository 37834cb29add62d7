"""`cnnops register`: the best candidate checkpoint becomes a new version, alias challenger."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from cnnops.errors import DataError, RegistryError
from cnnops.registry.model import (
    ImageClassifier,
    check_images,
    image_shape,
    requirements,
    signature,
)
from cnnops.registry.store import CHALLENGER, CHAMPION, connect, version_by_alias

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
    """The candidate with the best validation metric; the earlier one (train) wins a tie."""
    key = f"best_{select_by}"
    scored = [c for c in candidates if isinstance(c.run.get(key), int | float)]
    if not scored:
        names = [str(c.checkpoint.parent) for c in candidates] or ["none found"]
        raise DataError(
            f"no candidate with {key} in its run.json ({', '.join(names)}); "
            "run `cnnops train` first"
        )
    sign = 1.0 if select_by.endswith("acc") else -1.0
    return max(scored, key=lambda c: sign * c.run[key])


def _version_tags(config: Config, candidate: Candidate, model: Classifier) -> dict[str, str]:
    from cnnops import tracking

    hp, select_by = model.hparams, config.registry.select_by
    tags = {
        "cnnops.candidate": candidate.name,
        "cnnops.run_id": str(candidate.run.get("mlflow_run_id")),
        "cnnops.select_by": select_by,
        "val_acc": str(candidate.run.get("best_val_acc")),
        "val_loss": str(candidate.run.get("best_val_loss")),
        "git.commit": tracking.git_commit(),
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
        **tracking.dvc_hashes([config.paths.prepared, candidate.checkpoint.parent]),
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
        "input": "raw uint8 images (N, C, H, W)",
        "output": "class probabilities (N, K)",
    }
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ImageClassifier(),
        artifacts={"checkpoint": str(candidate.checkpoint)},
        signature=signature(image_shape(model), len(hp["classes"])),
        input_example=example,
        pip_requirements=requirements(),
        metadata=metadata,
    )


def register(config: Config) -> dict[str, Any]:
    """`cnnops register`: the best candidate becomes a new model version, alias challenger."""
    from mlflow.exceptions import MlflowException

    from cnnops.data import prepare
    from cnnops.train import load_classifier

    paths, name = config.paths, config.registry.model_name
    candidate = pick(
        find_candidates(paths.models, config.registry.candidates), config.registry.select_by
    )
    model = load_classifier(candidate.checkpoint)
    example = np.ascontiguousarray(prepare.load(paths.prepared).x["test"][:2])
    check_images(example, model)
    client = connect(config.mlflow)
    run_id = _existing_run(client, candidate)
    # Logged into the candidate's own training run, so the version links to its curves and params.
    with mlflow.start_run(run_id=run_id):
        info = _log_model(candidate, model, example)
    version = mlflow.register_model(
        info.model_uri, name, tags=_version_tags(config, candidate, model)
    )
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
        "candidate": candidate.name,
        "model_uri": f"models:/{name}/{version.version}",
        "aliases": {
            CHALLENGER: int(version.version),
            CHAMPION: int(previous.version) if previous else None,
        },
    }
    from cnnops import reports

    reports.write_json(paths.models / "registry.json", pointer)
    return pointer


def _existing_run(client: MlflowClient, candidate: Candidate) -> str:
    from mlflow.exceptions import MlflowException

    run_id = candidate.run.get("mlflow_run_id")
    try:
        return client.get_run(str(run_id)).info.run_id
    except MlflowException:
        raise RegistryError(
            f"{candidate.checkpoint.parent / 'run.json'}: MLflow run {run_id!r} not found in the "
            "registry's tracking store; train and register against the same mlflow.tracking_uri"
        ) from None
