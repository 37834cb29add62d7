"""The evaluate stage: models loaded from the registry, scored on the test split."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnops import registry, reports
from cnnops.config import Config
from cnnops.data import prepare

Predict = Callable[[np.ndarray], np.ndarray]
"""Raw uint8 images (N, C, H, W) → class probabilities (N, K)."""
INSIGHT_IMAGES = 16
"""Test images `cnnops.insight` draws from: the misclassified first."""


def score(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of class probabilities
    (N, K) against labels `y`."""
    y_pred = proba.argmax(axis=1)
    cm = reports.confusion_matrix(y, y_pred, len(classes))
    per_class = reports.per_class(cm, classes)
    return {
        "test_acc": float((y_pred == y).mean()),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "test_samples": len(y),
        "per_class": per_class,
        "confusion": cm,
        "y_pred": y_pred,
    }


def write_reports(
    result: dict[str, Any], classes: list[str], folder: Path, prefix: str = "eval"
) -> dict:
    result.pop("y_pred")
    cm = result.pop("confusion")
    rows = [
        {"actual": classes[i], "predicted": classes[j]}
        for i, j in np.ndindex(cm.shape)
        for _ in range(cm[i, j])
    ]
    reports.write_csv(folder / f"{prefix}_confusion.csv", rows)
    reports.plot_confusion(cm, classes, folder / f"{prefix}_confusion.png")
    reports.write_json(folder / f"{prefix}_per_class.json", result.pop("per_class"))
    reports.write_json(folder / f"{prefix}.json", result)
    return result


def timed_predict(predict: Predict, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Class probabilities of `x`, predicted a batch at a time, and the speed in images per
    second (after one warm-up batch)."""
    predict(x[:batch_size])
    started = time.perf_counter()
    proba = np.concatenate([predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return proba, round(len(x) / max(time.perf_counter() - started, 1e-9), 1)


def _score_alias(
    client: Any, alias: str, data: prepare.Prepared, config: Config
) -> tuple[dict[str, Any], Any]:
    """The scores of the model at `alias`, and that model (MLflow's pyfunc)."""
    model, version = registry.load_model(client, config.registry.model_name, alias)
    # One pass over the test split gives both the predictions and the inference speed.
    proba, speed = timed_predict(model.predict, data.x["test"], config.evaluate.batch_size)
    result = score(proba, data.y["test"], data.classes)
    result["images_per_s"] = speed
    result.update(
        model_name=config.registry.model_name, model_version=int(version.version), alias=alias
    )
    return result, model


def _challenger_reports(result: dict[str, Any], data: prepare.Prepared, folder: Path) -> dict:
    x, y, y_pred = data.x["test"], data.y["test"], result["y_pred"]
    wrong = np.flatnonzero(y_pred != y)
    reports.plot_misclassified(
        x[wrong], y[wrong], y_pred[wrong], data.classes, folder / "eval_misclassified.png"
    )
    return write_reports(result, data.classes, folder, "eval")


def _insight(
    model: Any, data: prepare.Prepared, y_pred: np.ndarray, folder: Path
) -> dict[str, Path]:
    """What the model learned (`cnnops.insight`), seen on test images, the misclassified first.
    No picture of an earlier model stays in `folder`; files of anyone else's do."""
    from cnnops.insight import PICTURES, explain

    x, y = data.x["test"], data.y["test"]
    order = np.concatenate([np.flatnonzero(y_pred != y), np.flatnonzero(y_pred == y)])
    picked = order[:INSIGHT_IMAGES]
    for name in PICTURES:
        (folder / name).unlink(missing_ok=True)
    return explain(model.unwrap_python_model().model, x[picked], y[picked], data.classes, folder)


def _champion_report(result: dict[str, Any] | None, folder: Path) -> dict:
    """Only the champion's numbers: its plots were drawn back when it was the challenger."""
    summary = {
        k: v
        for k, v in (result or {"model_version": None}).items()
        if k not in ("y_pred", "confusion", "per_class")
    }
    reports.write_json(folder / "eval_champion.json", summary)
    return summary


def evaluate_stage(config: Config) -> dict[str, Any]:
    """`cnnops evaluate`: score @challenger (and @champion, if any) loaded from the registry."""
    from cnnops import tracking

    data, folder = prepare.load(config.paths.prepared), config.paths.reports
    name = config.registry.model_name
    client = registry.connect(config.mlflow)
    challenger, model = _score_alias(client, registry.CHALLENGER, data, config)
    has_champion = registry.version_by_alias(client, name, registry.CHAMPION) is not None
    champion = _score_alias(client, registry.CHAMPION, data, config)[0] if has_champion else None
    insight = _insight(model, data, challenger["y_pred"], folder / "insight")
    results = {
        "challenger": _challenger_reports(challenger, data, folder),
        "champion": _champion_report(champion, folder),
    }
    with tracking.MlflowTracker(
        config.mlflow,
        run_name="evaluate",
        tags={
            "cnnops.stage": "evaluate",
            "model.name": name,
            **{f"model.{alias}_version": str(r["model_version"]) for alias, r in results.items()},
        },
    ) as tracker:
        for alias, r in results.items():
            scores = {f"{alias}_{k}": v for k, v in r.items() if k != "model_version"}
            tracker.log_metrics(scores, step=0)
        for path in (
            "eval.json",
            "eval_champion.json",
            "eval_per_class.json",
            "eval_confusion.png",
            "eval_misclassified.png",
        ):
            tracker.log_artifact(folder / path, "evaluate")
        for picture in insight.values():
            tracker.log_artifact(picture, "evaluate/insight")
    return results
