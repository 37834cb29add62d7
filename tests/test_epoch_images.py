"""Per-epoch images in MLflow: the confusion matrix and misclassified grid of a real (tiny) run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnops import tracking
from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.data.sources import fetch
from cnnops.epoch_images import draw_confusion, draw_misclassified
from cnnops.train import train


def test_confusion_matrix_and_grid_keep_their_size_whatever_the_predictions() -> None:
    classes = [str(i) for i in range(10)]
    y = np.arange(100) % 10
    x = np.zeros((100, 1, 8, 8), np.uint8)
    for pred in (y, (y + 1) % 10):  # none wrong, all wrong
        cm = np.bincount(y * 10 + pred, minlength=100).reshape(10, 10)
        assert draw_confusion(cm, classes).size == draw_confusion(cm * 0, classes).size
        assert draw_misclassified(x, y, pred, classes).size == (400, 24 + 4 * 116)


def test_each_epoch_logs_its_images_and_curves_under_mlflow_names(workdir: Path) -> None:
    config = load_config(workdir / "params.yaml", ["train.max_epochs=2", "model.fc=[16]"])
    fetch(config.fetch, config.paths.raw)
    prepare.prepare(config, config.paths.raw, config.paths.prepared, workdir / "data.json")
    with tracking.MlflowTracker(config.mlflow, "train") as tracker:
        train(config, prepare.load(config.paths.prepared), workdir / "out", tracker)
    client = tracking.client(config.mlflow)
    run = client.get_run(tracker.run_id)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_seconds"} <= set(
        run.data.metrics
    )
    assert not {"train_loss", "val_acc"} & set(run.data.metrics)  # the CSV's names stay local
    images = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    for key in ("val~confusion_matrix", "val~misclassified"):
        steps = {p.split("+step+")[1].split("+")[0] for p in images if f"/{key}+" in p}
        assert steps == {"1", "2"}, images
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
