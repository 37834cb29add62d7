"""The promotion gate, rollback, and the ONNX export of the champion."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnops.errors import DataError, RegistryError
from cnnops.registry.store import (
    CHALLENGER,
    CHAMPION,
    connect,
    load_model,
    require_alias,
    set_tags,
    verified_model,
    version_by_alias,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cnnops.config import Config


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
        raise DataError(
            f"{report}: holds no {metric} for version {version.version} "
            f"(found version {data.get('model_version')}); run `cnnops evaluate` first"
        )
    return float(data[metric])


def promote(config: Config) -> dict[str, Any]:
    """`cnnops promote`: champion moves to the challenger if it wins the test metric; ONNX."""
    reg, reports_dir = config.registry, config.paths.reports
    client = connect(config.mlflow)
    challenger = require_alias(client, reg.model_name, CHALLENGER)
    champion = version_by_alias(client, reg.model_name, CHAMPION)
    verified_model(client, reg.model_name, challenger)  # a swapped file never gets the alias
    ours = _score_of(reports_dir / "eval.json", challenger, reg.metric)
    theirs = _score_of(reports_dir / "eval_champion.json", champion, reg.metric)
    # Neither a re-run on the champion itself nor a rolled-back version gets a new decision record:
    # the rolled-back one keeps the record of its promotion, and its rollback tags say the rest.
    decided = False
    if champion is not None and champion.version == challenger.version:
        promoted, reason = False, "the challenger already is the champion"
    elif "rollback.time" in challenger.tags:
        promoted, reason = False, f"rolled back at {challenger.tags['rollback.time']}; never again"
    else:
        decided = True
        promoted, reason = decide(ours or 0.0, theirs, reg.min_delta)
    record = {
        "promotion.decision": "promoted" if promoted else "kept champion",
        "promotion.reason": reason,
        "promotion.time": _now(),
        "promotion.metric": reg.metric,
        "promotion.challenger_score": str(ours),
        "promotion.champion_score": str(theirs),
        "promotion.previous_champion": champion.version if champion else "none",
    }
    if promoted:
        _move_champion(client, reg.model_name, challenger, champion, record)
    elif decided:
        set_tags(client, reg.model_name, challenger.version, record)
    now_champion = challenger if promoted else champion
    result = {
        "model_name": reg.model_name,
        "challenger_version": int(challenger.version),
        "champion_version": int(now_champion.version) if now_champion else None,
        "promoted": promoted,
        "reason": reason,
        "metric": reg.metric,
        "challenger_score": ours,
        "champion_score": theirs,
    }
    result.update(export_champion(config, client))
    from cnnops import reports

    reports.write_json(reports_dir / "promotion.json", result)
    return result


def _move_champion(
    client: MlflowClient,
    name: str,
    new: ModelVersion,
    old: ModelVersion | None,
    record: dict[str, Any],
) -> None:
    client.set_registered_model_alias(name, CHAMPION, new.version)
    try:
        set_tags(client, name, new.version, record)
        if old is not None:
            set_tags(
                client,
                name,
                old.version,
                {
                    "champion.replaced_by": new.version,
                    "champion.replaced_at": record["promotion.time"],
                },
            )
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
        raise RegistryError(
            f"{name}@champion is version {current.version}, which replaced no "
            "earlier champion: nothing to roll back to"
        )
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise RegistryError(
            f"{name} version {previous} (the previous champion) no longer exists"
        ) from None
    now = _now()
    client.set_registered_model_alias(name, CHAMPION, previous)
    set_tags(client, name, current.version, {"rollback.time": now, "rollback.to": previous})
    set_tags(
        client,
        name,
        previous,
        {"rollback.restored_at": now, "rollback.restored_from": current.version},
    )
    return {
        "model_name": name,
        "champion_version": int(previous),
        "rolled_back_version": int(current.version),
        "time": now,
    }


def export_champion(config: Config, client: MlflowClient) -> dict[str, Any]:
    """Export `@champion` (its checkpoint verified first) to ONNX, check onnxruntime against
    PyTorch, and record both, with the ONNX file's SHA-256 (`onnx.sha256`), on the version."""
    from cnnops import export, tracking
    from cnnops.checkpoints import sha256_file
    from cnnops.data import prepare

    reg = config.registry
    model, version = load_model(client, reg.model_name, CHAMPION)
    classifier = model.unwrap_python_model().model
    x = np.ascontiguousarray(prepare.load(config.paths.prepared).x["test"][: reg.onnx_samples])
    path = export.to_onnx(classifier, x[:1], config.paths.models / "champion.onnx")
    diff = export.max_abs_diff(path, model.predict, x)
    onnx_sha256 = sha256_file(path)
    with tracking.MlflowTracker(
        config.mlflow,
        run_name="export-onnx",
        tags={
            "cnnops.stage": "promote",
            "model.name": reg.model_name,
            "model.version": version.version,
        },
    ) as tracker:
        tracker.log_artifact(path, "onnx")
        tracker.log_metrics({"onnx_max_abs_diff": diff}, step=0)
    passed = diff <= reg.onnx_atol
    set_tags(
        client,
        reg.model_name,
        version.version,
        {
            "onnx.max_abs_diff": f"{diff:.3g}",
            "onnx.parity": "pass" if passed else "fail",
            "onnx.atol": reg.onnx_atol,
            "onnx.samples": len(x),
            "onnx.artifact": f"runs:/{tracker.run_id}/onnx/{path.name}",
            "onnx.sha256": onnx_sha256,
        },
    )
    return {"onnx_max_abs_diff": diff, "onnx_parity_ok": passed, "onnx_sha256": onnx_sha256}
