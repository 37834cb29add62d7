"""The train stage: a real (tiny) training run, its checkpoints, reports and MLflow record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from cnnops.checkpoints import load_classifier
from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.data.sources import fetch
from cnnops.train import train, train_stage


@pytest.fixture
def digits(workdir: Path) -> prepare.Prepared:
    config = load_config(workdir / "params.yaml")
    fetch(config.fetch, config.paths.raw)
    prepare.prepare(
        config, config.paths.raw, config.paths.prepared, config.paths.reports / "data.json"
    )
    return prepare.load(config.paths.prepared)


def tiny(workdir: Path, *overrides: str):
    return load_config(workdir / "params.yaml", ["train.max_epochs=3", *overrides])


def test_smoke_train_learns_and_writes_best_and_last(
    workdir: Path, digits: prepare.Prepared
) -> None:
    result = train(tiny(workdir), digits, workdir / "ckpt")
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    assert result.metrics["epochs_run"] == len(result.curves) == 3
    assert result.metrics["cuda_graphs"] is False  # a CPU run: every step eager
    assert result.metrics["best_val_acc"] > 0.8
    model = load_classifier(result.best_checkpoint).eval()
    x = torch.from_numpy(digits.x["val"][:64])
    with torch.inference_mode():
        acc = (model.predict_proba(x).argmax(1).numpy() == digits.y["val"][:64]).mean()
    assert acc > 0.8
    assert model.hparams["config"]["train"]["max_epochs"] == 3  # the resolved config rides along


def test_same_seed_gives_identical_curves(workdir: Path, digits: prepare.Prepared) -> None:
    config = tiny(workdir, "train.max_epochs=2", "model.noise_std=0.1")
    a = train(config, digits, workdir / "a").curves
    b = train(config, digits, workdir / "b").curves
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_early_stopping_stops_when_nothing_improves_enough(
    workdir: Path, digits: prepare.Prepared
) -> None:
    config = tiny(
        workdir,
        "train.max_epochs=10",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=100",
    )
    result = train(config, digits, workdir / "ckpt")
    assert result.metrics["stopped_early"] is True
    assert result.metrics["epochs_run"] == 3


def test_l1_penalty_shrinks_weights(workdir: Path, digits: prepare.Prepared) -> None:
    def mean_abs_weight(*overrides: str) -> float:
        result = train(tiny(workdir, "train.max_epochs=2", *overrides), digits, workdir / "l1")
        model = load_classifier(result.last_checkpoint)
        return float(
            torch.cat([p.abs().flatten() for p in model.net.parameters() if p.ndim > 1]).mean()
        )

    assert mean_abs_weight("train.l1=1e-3") < 0.7 * mean_abs_weight("train.l1=0")


def test_train_stage_records_the_run_in_mlflow(workdir: Path, digits: prepare.Prepared) -> None:
    config = tiny(workdir)
    metrics = train_stage(config)
    run_id = json.loads((workdir / "models/train/run.json").read_text())["mlflow_run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.conv.0.filters"] == "32"
    assert run.data.params["train.max_epochs"] == "3"
    assert {"git.commit", "torch", "device"} <= set(run.data.tags)
    history = client.get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.resolved.yaml", "train_curves.png", "train_curves.csv"} <= artifacts
    curves = (workdir / "reports/train_curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc")
    assert len(curves) == 1 + metrics["epochs_run"]


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step"])
def test_learning_rate_follows_the_schedule(
    workdir: Path, digits: prepare.Prepared, schedule: str
) -> None:
    config = tiny(workdir, f"train.scheduler.name={schedule}", "train.scheduler.step_size=1")
    lrs = [row["lr"] for row in train(config, digits, workdir / "ckpt").curves]
    assert len(set(lrs)) == 3  # a new rate every epoch
    if schedule != "onecycle":
        assert lrs == sorted(lrs, reverse=True)


def test_cuda_graphs_true_without_a_cuda_device_names_the_key(
    workdir: Path, digits: prepare.Prepared
) -> None:
    from cnnops.errors import ConfigError

    config = tiny(workdir, "train.accelerator=cpu", "train.cuda_graphs=true")
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs = true: .*CUDA device"):
        train(config, digits, workdir / "ckpt")
    assert not (workdir / "ckpt").exists()


def test_a_captured_optimizer_step_without_a_captured_step_names_the_key(
    workdir: Path, digits: prepare.Prepared
) -> None:
    from cnnops.errors import ConfigError

    config = tiny(workdir, "train.accelerator=cpu", "train.cuda_graphs_optimizer=true")
    with pytest.raises(
        ConfigError, match=r"train\.cuda_graphs_optimizer = true: the training step is not captured"
    ):
        train(config, digits, workdir / "ckpt")
    assert not (workdir / "ckpt").exists()
    # auto: the optimizer steps eagerly wherever the training step does.
    result = train(
        tiny(workdir, "train.max_epochs=1", "train.cuda_graphs_optimizer=auto"),
        digits,
        workdir / "auto",
    )
    assert result.metrics["cuda_graphs"] is False and result.metrics["epochs_run"] == 1


def test_a_rerun_with_augmentation_replaces_its_own_output(
    workdir: Path, digits: prepare.Prepared
) -> None:
    # The augmentation preview belongs to the run's folder, so the next run may replace it.
    config = tiny(workdir, "train.max_epochs=1", "augment.transforms=[{name: hflip, p: 0.5}]")
    for _ in range(2):
        train_stage(config)
    assert (workdir / "models/train/augment_preview.png").is_file()
    assert MlflowClient().search_runs(experiment_ids=["1"])[0].info.status == "FINISHED"
