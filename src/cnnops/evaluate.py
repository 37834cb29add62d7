"""The evaluate stage: test-set accuracy, per-class report and confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnops import reports
from cnnops.config import Config
from cnnops.data import prepare

Predict = Callable[[np.ndarray], np.ndarray]
"""Raw uint8 images (N, C, H, W) → class probabilities (N, K)."""


def checkpoint_predictor(path: Path, batch_size: int = 512) -> Predict:
    from cnnops.train import load_classifier

    model = load_classifier(path).eval()

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        parts = [model.predict_proba(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts).numpy()

    return predict


def score(predict: Predict, x: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of `predict` on (x, y)."""
    proba = predict(x)
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


def write_reports(result: dict[str, Any], classes: list[str], folder: Path, prefix: str = "eval") -> dict:
    result.pop("y_pred")
    cm = result.pop("confusion")
    rows = [{"actual": classes[i], "predicted": classes[j]}
            for i, j in np.ndindex(cm.shape) for _ in range(cm[i, j])]
    reports.write_csv(folder / f"{prefix}_confusion.csv", rows)
    reports.plot_confusion(cm, classes, folder / f"{prefix}_confusion.png")
    reports.write_json(folder / f"{prefix}_per_class.json", result.pop("per_class"))
    reports.write_json(folder / f"{prefix}.json", result)
    return result


def evaluate_stage(config: Config) -> dict[str, Any]:
    """`cnnops evaluate`: score the trained model on the held-out test split."""
    paths = config.paths
    data = prepare.load(paths.prepared)
    predict = checkpoint_predictor(paths.models / "train" / "best.ckpt", config.evaluate.batch_size)
    result = score(predict, data.x["test"], data.y["test"], data.classes)
    return write_reports(result, data.classes, paths.reports)
