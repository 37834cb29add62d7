"""The model registry: register the best candidate, gate promotion with aliases, load and serve.

Aliases, not the deprecated stages: `challenger` marks the newest registered version, `champion`
the one in production. Every alias move leaves tags on the versions saying who, why and when.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from cnnops.errors import DataError, RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cnnops.config import Config, Mlflow
    from cnnops.module import Classifier

CHALLENGER, CHAMPION = "challenger", "champion"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw uint8 images (N, C, H, W) in, class probabilities (N, K) out; normalization inside."""

    batch_size = 512

    def load_context(self, context: Any) -> None:
        from cnnops.train import load_classifier

        self.model = load_classifier(Path(context.artifacts["checkpoint"])).eval()

    # `np.ndarray` is the one hint MLflow neither complains about nor derives a schema from.
    def predict(self, context: Any, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        x = check_images(np.asarray(model_input), self.model)
        with torch.inference_mode():
            parts = [self.model.predict_proba(torch.from_numpy(np.ascontiguousarray(chunk)))
                     for chunk in np.split(x, range(self.batch_size, len(x), self.batch_size))]
        return torch.cat(parts).numpy().astype(np.float32)


def image_shape(model: Classifier) -> tuple[int, int, int]:
    hp = model.hparams
    return (hp["in_channels"], hp["image_size"], hp["image_size"])


def check_images(x: np.ndarray, model: Classifier) -> np.ndarray:
    """Refuse anything but raw uint8 pixels of the trained shape, with a message saying what came."""
    from mlflow.exceptions import MlflowException

    shape = image_shape(model)
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise MlflowException.invalid_parameter_value(
            f"expected raw uint8 images of shape (N, {', '.join(map(str, shape))}); "
            f"got {x.dtype} {tuple(x.shape)}")
    return x


# ---- connecting -------------------------------------------------------------------------------


def connect(cfg: Mlflow) -> MlflowClient:
    """A client on the configured registry, after checking it answers (fails fast, never retries)."""
    import mlflow

    from cnnops import tracking

    uri = tracking.tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _check_health(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = tracking.client(cfg)
    try:
        client.search_registered_models(max_results=1)
    except Exception as e:  # any backend failure here means: not usable as a registry
        raise RegistryError(f"model registry at {uri} is unusable: {_first_line(e)}") from None
    return client


def _check_health(uri: str) -> None:
    import urllib.request

    # MLflow's REST client retries for minutes; one short probe gives the user an answer now.
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            response.read()
    except OSError as e:
        raise RegistryError(
            f"model registry at {uri} is unreachable ({e}); start the MLflow server or point "
            "mlflow.tracking_uri / MLFLOW_TRACKING_URI at a running one") from None


def _first_line(e: Exception) -> str:
    text = str(getattr(e, "message", e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def require_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    """The version `name@alias`, or a RegistryError naming whichever of the two is missing."""
    from mlflow.exceptions import MlflowException

    found = version_by_alias(client, name, alias)
    if found is not None:
        return found
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r} (registry.model_name); "
                            "run `cnnops register` first") from None
    raise RegistryError(f"registered model {name!r} has no @{alias} alias; "
                        f"run `cnnops {'register' if alias == CHALLENGER else 'promote'}` first")


def load_model(client: MlflowClient, name: str, alias: str) -> tuple[Any, ModelVersion]:
    """The pyfunc model behind `models:/name@alias` and the version it resolved to."""
    version = require_alias(client, name, alias)
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}"), version


# ---- registering ------------------------------------------------------------------------------


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
        raise DataError(f"no candidate with {key} in its run.json ({', '.join(names)}); "
                        "run `cnnops train` first")
    sign = 1.0 if select_by.endswith("acc") else -1.0
    return max(scored, key=lambda c: sign * c.run[key])


def _signature(shape: tuple[int, ...], num_classes: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))


def _requirements() -> list[str]:
    # Stated, not inferred: inference loads the model in a subprocess, slow and fragile.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "lightning", "numpy", "mlflow")]


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
        "preprocessing": json.dumps({"input": "uint8 NCHW, 0..255", "scale": 1 / 255,
                                     "mean": list(hp["mean"]), "std": list(hp["std"])}),
        "params": json.dumps({"model": hp["model"], "train": hp["train"]}, sort_keys=True)[:5000],
        **tracking.dvc_hashes([config.paths.prepared, candidate.checkpoint.parent]),
    }
    if "params" in candidate.run:
        tags["cnnops.tuned_params"] = json.dumps(candidate.run["params"], sort_keys=True)[:5000]
    return tags


def _log_model(candidate: Candidate, model: Classifier, example: np.ndarray) -> Any:
    hp = model.hparams
    metadata = {"classes": list(hp["classes"]), "mean": list(hp["mean"]), "std": list(hp["std"]),
                "input": "raw uint8 images (N, C, H, W)", "output": "class probabilities (N, K)"}
    return mlflow.pyfunc.log_model(
        name="model", python_model=ImageClassifier(),
        artifacts={"checkpoint": str(candidate.checkpoint)},
        signature=_signature(image_shape(model), len(hp["classes"])), input_example=example,
        pip_requirements=_requirements(), metadata=metadata)


def register(config: Config) -> dict[str, Any]:
    """`cnnops register`: the best candidate becomes a new version of the model, alias challenger."""
    from mlflow.exceptions import MlflowException

    from cnnops.data import prepare
    from cnnops.train import load_classifier

    paths, name = config.paths, config.registry.model_name
    candidate = pick(find_candidates(paths.models, config.registry.candidates),
                     config.registry.select_by)
    model = load_classifier(candidate.checkpoint)
    example = np.ascontiguousarray(prepare.load(paths.prepared).x["test"][:2])
    check_images(example, model)
    client = connect(config.mlflow)
    run_id = _existing_run(client, candidate)
    # Logged into the candidate's own training run, so the version links to its curves and params.
    with mlflow.start_run(run_id=run_id):
        info = _log_model(candidate, model, example)
    version = mlflow.register_model(info.model_uri, name, tags=_version_tags(config, candidate, model))
    try:
        previous = version_by_alias(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    except (MlflowException, OSError):
        client.delete_model_version(name, version.version)  # nothing half-registered
        raise
    pointer = {"model_name": name, "version": int(version.version), "run_id": run_id,
               "candidate": candidate.name, "model_uri": f"models:/{name}/{version.version}",
               "aliases": {CHALLENGER: int(version.version),
                           CHAMPION: int(previous.version) if previous else None}}
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


# ---- the promotion gate -----------------------------------------------------------------------


def decide(challenger: float, champion: float | None, min_delta: float) -> tuple[bool, str]:
    """Whether the challenger's score earns it the champion alias, and why (strictly better)."""
    if champion is None:
        return True, "first version: there was no champion"
    gain = challenger - champion
    if gain > 0 and gain >= min_delta - 1e-12:
        return True, f"better by {gain:+.4f} (>= min_delta {min_delta:g})"
    return False, f"gain {gain:+.4f} is below min_delta {min_delta:g} or not positive"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _score_of(report: Path, version: ModelVersion | None, metric: str) -> float | None:
    """The metric evaluate wrote for `version`, refusing a report about another version."""
    if version is None:
        return None
    data = json.loads(report.read_text()) if report.is_file() else {}
    if str(data.get("model_version")) != str(version.version) or metric not in data:
        raise DataError(f"{report}: holds no {metric} for version {version.version} "
                        f"(found version {data.get('model_version')}); run `cnnops evaluate` first")
    return float(data[metric])


def promote(config: Config) -> dict[str, Any]:
    """`cnnops promote`: move champion to the challenger if it wins on the test metric; export ONNX."""
    reg, reports_dir = config.registry, config.paths.reports
    client = connect(config.mlflow)
    challenger = require_alias(client, reg.model_name, CHALLENGER)
    champion = version_by_alias(client, reg.model_name, CHAMPION)
    ours = _score_of(reports_dir / "eval.json", challenger, reg.metric)
    theirs = _score_of(reports_dir / "eval_champion.json", champion, reg.metric)
    if champion is not None and champion.version == challenger.version:
        promoted, reason = False, "the challenger already is the champion"
    elif "rollback.time" in challenger.tags:
        promoted, reason = False, f"rolled back at {challenger.tags['rollback.time']}; never again"
    else:
        promoted, reason = decide(ours or 0.0, theirs, reg.min_delta)
    record = {"promotion.decision": "promoted" if promoted else "kept champion",
              "promotion.reason": reason, "promotion.time": _now(), "promotion.metric": reg.metric,
              "promotion.challenger_score": str(ours), "promotion.champion_score": str(theirs),
              "promotion.previous_champion": champion.version if champion else "none"}
    if promoted:
        _move_champion(client, reg.model_name, challenger, champion, record)
    elif champion is None or champion.version != challenger.version:
        _set_tags(client, reg.model_name, challenger.version, record)
    result = {"model_name": reg.model_name, "challenger_version": int(challenger.version),
              "champion_version": int(challenger.version if promoted else champion.version),  # type: ignore[union-attr]
              "promoted": promoted, "reason": reason, "metric": reg.metric,
              "challenger_score": ours, "champion_score": theirs}
    result.update(export_champion(config, client))
    from cnnops import reports

    reports.write_json(reports_dir / "promotion.json", result)
    return result


def _set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _move_champion(client: MlflowClient, name: str, new: ModelVersion, old: ModelVersion | None,
                   record: dict[str, Any]) -> None:
    client.set_registered_model_alias(name, CHAMPION, new.version)
    try:
        _set_tags(client, name, new.version, record)
        if old is not None:
            _set_tags(client, name, old.version, {"champion.replaced_by": new.version,
                                                 "champion.replaced_at": record["promotion.time"]})
    except Exception:
        # An unrecorded promotion is worse than none: put the alias back where it was.
        if old is not None:
            client.set_registered_model_alias(name, CHAMPION, old.version)
        else:
            client.delete_registered_model_alias(name, CHAMPION)
        raise


def rollback(config: Config) -> dict[str, Any]:
    """`cnnops rollback`: champion goes back to the version it replaced."""
    from mlflow.exceptions import MlflowException

    name = config.registry.model_name
    client = connect(config.mlflow)
    current = require_alias(client, name, CHAMPION)
    previous = current.tags.get("promotion.previous_champion", "none")
    if previous == "none":
        raise RegistryError(f"{name}@champion is version {current.version}, which replaced no "
                            "earlier champion: nothing to roll back to")
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise RegistryError(f"{name} version {previous} (the previous champion) no longer exists") from None
    now = _now()
    client.set_registered_model_alias(name, CHAMPION, previous)
    _set_tags(client, name, current.version, {"rollback.time": now, "rollback.to": previous})
    _set_tags(client, name, previous, {"rollback.restored_at": now,
                                       "rollback.restored_from": current.version})
    return {"model_name": name, "champion_version": int(previous),
            "rolled_back_version": int(current.version), "time": now}


# ---- export and serving -----------------------------------------------------------------------


def export_champion(config: Config, client: MlflowClient) -> dict[str, Any]:
    """Export `@champion` to ONNX, check onnxruntime against PyTorch, record both on the version."""
    from cnnops import export, tracking
    from cnnops.data import prepare

    reg = config.registry
    model, version = load_model(client, reg.model_name, CHAMPION)
    classifier = model.unwrap_python_model().model
    x = np.ascontiguousarray(prepare.load(config.paths.prepared).x["test"][: reg.onnx_samples])
    path = export.to_onnx(classifier, x[:1], config.paths.models / "champion.onnx")
    diff = export.max_abs_diff(path, model.predict, x)
    tracker = tracking.MlflowTracker(config.mlflow, run_name="export-onnx",
                                     tags={"cnnops.stage": "promote", "model.name": reg.model_name,
                                           "model.version": version.version})
    tracker.log_artifact(path, "onnx")
    tracker.log_metrics({"onnx_max_abs_diff": diff}, step=0)
    tracker.close()
    passed = diff <= reg.onnx_atol
    _set_tags(client, reg.model_name, version.version, {
        "onnx.max_abs_diff": f"{diff:.3g}", "onnx.parity": "pass" if passed else "fail",
        "onnx.atol": reg.onnx_atol, "onnx.samples": len(x),
        "onnx.artifact": f"runs:/{tracker.run_id}/onnx/{path.name}"})
    return {"onnx_max_abs_diff": diff, "onnx_parity_ok": passed}


def serve_command(config: Config, alias: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow models serve` command line (and environment) for `name@alias`."""
    import os
    import sys

    from cnnops import tracking

    client = connect(config.mlflow)
    require_alias(client, config.registry.model_name, alias)
    uri = f"models:/{config.registry.model_name}@{alias}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(config.mlflow)}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", host, "--port", str(port)]
    return command, env
