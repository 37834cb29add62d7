"""The train stage: one `train()` shared by `cnnops train` and every tuning trial."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from cnnops.config import Config, Train, dump_config, flatten
from cnnops.data.datamodule import ImageData
from cnnops.data.prepare import Prepared
from cnnops.errors import ConfigError, DataError
from cnnops.module import Classifier
from cnnops.tracking import NullTracker, Tracker

CURVE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


class Curves(Callback):
    """Collects one row of epoch metrics and hands it to the tracker: one GPU sync per epoch."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = {**trainer.callback_metrics, **module.epoch_metrics("train")}  # type: ignore[operator]
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        row.update({k: round(float(metrics[k]), 6) for k in CURVE_KEYS if k in metrics})
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append(row)
        if trainer.is_global_zero:
            self.tracker.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, Any]
    curves: list[dict[str, float]] = field(default_factory=list)


def build_module(config: Config, prepared: Prepared) -> Classifier:
    channels, size, _ = prepared.shape
    return Classifier(
        model=config.model.model_dump(mode="json"),
        train=config.train.model_dump(mode="json"),
        in_channels=channels,
        num_classes=len(prepared.classes),
        image_size=size,
        mean=prepared.mean,
        std=prepared.std,
        classes=prepared.classes,
        config=config.model_dump(mode="json"),
    )


def _precision(value: str) -> Any:
    return "32-true" if value == "32" else value


def batched_engine(config: Config, prepared: Prepared) -> torch.nn.Module | None:
    """The on-device augmentation engine when the spec allows it (the fast path), else None."""
    spec = config.augment
    if not spec.transforms or spec.engine == "albumentations":
        return None
    from cnnops.augment import resolve
    from cnnops.augment_batched import BatchAugment, supports

    resolved = resolve(spec)
    if not supports(resolved):
        if spec.engine == "batched":
            names = sorted({n for n, _, _ in resolved})
            raise ConfigError(
                f"augment.engine = 'batched': not every transform of {names} has a "
                "batched implementation; use engine: auto or albumentations"
            )
        return None
    return BatchAugment(resolved, seed=config.train.seed)


def use_cuda_graphs(t: Train, trainer: L.Trainer) -> bool:
    """Whether `train.cuda_graphs` (auto or true) applies to this trainer; true where it cannot
    is a ConfigError naming the reason."""
    if t.cuda_graphs is False:
        return False
    if trainer.strategy.root_device.type != "cuda":
        why = "training does not run on a CUDA device"
    elif trainer.world_size > 1:
        why = "DDP runs eagerly"
    elif t.compile:
        why = "train.compile = true brings its own graphs"
    elif t.precision == "16-mixed":
        why = "16-mixed scales the loss outside the graph; use bf16-mixed"
    else:
        return True
    if t.cuda_graphs is True:
        raise ConfigError(f"train.cuda_graphs = true: {why}; use auto or false")
    return False


def best_row(rows: list[dict[str, float]], monitor: str) -> dict[str, float]:
    scored = [r for r in rows if monitor in r]
    if not scored:
        return rows[-1] if rows else {}
    pick = max if monitor.endswith("acc") else min
    return pick(scored, key=lambda r: r[monitor])


def train(
    config: Config,
    prepared: Prepared,
    out_dir: Path,
    tracker: Tracker | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train `config.model` on `prepared`; checkpoints (best and last) land in `out_dir`."""
    t = config.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    tracker = tracker or NullTracker()
    monitor = t.early_stopping.monitor
    mode = "max" if monitor.endswith("acc") else "min"
    curves = Curves(tracker)
    checkpoint = ModelCheckpoint(
        dirpath=out_dir,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_last=True,
        enable_version_counter=False,
    )
    all_callbacks: list[Callback] = [curves, checkpoint, *(callbacks or [])]
    if t.early_stopping.enabled:
        stopper = EarlyStopping(
            monitor=monitor,
            mode=mode,
            patience=t.early_stopping.patience,
            min_delta=t.early_stopping.min_delta,
        )
        all_callbacks.append(stopper)
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        sync_batchnorm=t.sync_batchnorm,
        precision=_precision(t.precision),
        deterministic=t.deterministic,
        logger=False,
        callbacks=all_callbacks,
        default_root_dir=out_dir,
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        # cuDNN autotuning costs seconds of warm-up that small networks never earn back.
        benchmark=False,
    )
    graphs = use_cuda_graphs(t, trainer)  # a setting that cannot apply fails before any output goes
    if rank_zero():  # stale checkpoints from an earlier run must not pass for this run's best
        shutil.rmtree(out_dir, ignore_errors=True)
    module = build_module(config, prepared)
    if t.channels_last and torch.cuda.is_available() and t.accelerator != "cpu":
        module = module.to(memory_format=torch.channels_last)  # NHWC convolutions on tensor cores
    if t.compile:
        module.net.compile()  # in place: checkpoint keys stay those of the plain module
    module.gpu_augment = batched_engine(config, prepared)
    if graphs:
        module.capture_train_step()
    workers_augment = config.augment if module.gpu_augment is None else None
    data = ImageData(
        prepared,
        t.batch_size,
        t.seed,
        eval_batch_size=config.evaluate.batch_size,
        augment=workers_augment,
        num_workers=t.num_workers,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    elapsed = time.perf_counter() - started
    if trainer.is_global_zero and config.augment.transforms:
        # Written after fit: Lightning warns about a non-empty checkpoint folder before it.
        tracker.log_artifact(save_pipeline(config, prepared, out_dir))
    best = best_row(curves.rows, monitor)
    metrics = {
        "best_epoch": int(best.get("epoch", 0)),
        "best_val_acc": best.get("val_acc"),
        "best_val_loss": best.get("val_loss"),
        "best_train_acc": best.get("train_acc"),
        "epochs_run": len(curves.rows),
        "stopped_early": bool(trainer.should_stop and len(curves.rows) < t.max_epochs),
        "stopped_epoch": len(curves.rows),
        "train_seconds": round(elapsed, 2),
        # Whether the training steps ran as a captured CUDA graph (train.cuda_graphs).
        "cuda_graphs": module.graph_step is not None and module.graph_step.captured,
    }
    return TrainResult(out_dir / "best.ckpt", out_dir / "last.ckpt", metrics, curves.rows)


def save_pipeline(config: Config, prepared: Prepared, out_dir: Path) -> Path:
    """The exact training transforms, serialized by Albumentations, beside the checkpoints."""
    from cnnops.augment import build_transforms, save_transforms

    path = out_dir / "transforms.json"
    shape = prepared.shape[1:]
    save_transforms(build_transforms(config.augment, True, shape, seed=config.train.seed), path)
    return path


def load_classifier(path: Path, map_location: str | torch.device = "cpu") -> Classifier:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint missing; run `cnnops train` first")
    return Classifier.load_from_checkpoint(path, map_location=map_location, weights_only=True)


def quiet_lightning() -> None:
    """Keep Lightning's start-up banners and tips out of a stage's output (and DVC's logs)."""
    import logging
    import warnings

    # Lightning sets its own log level when imported; this module has imported it already.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(on_after_batch_transfer|LeafSpec).*")


def rank_zero() -> bool:
    """True in the process that owns outputs: the only one, or rank 0 of a DDP launch."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def train_stage(config: Config) -> dict[str, Any]:
    """`cnnops train`: train, write reports, and record the run in MLflow with its provenance."""
    from cnnops import reports, tracking
    from cnnops.data import prepare

    quiet_lightning()
    paths = config.paths
    prepared = prepare.load(paths.prepared)
    if not rank_zero():  # DDP re-launches this command per rank; only rank 0 records anything
        return train(config, prepared, paths.models / "train").metrics
    with tracking.MlflowTracker(
        config.mlflow, run_name="train", tags={"cnnops.stage": "train"}
    ) as tracker:
        tracker.log_params(flatten(config))
        tracker.set_tags(
            {
                "git.commit": tracking.git_commit(),
                **tracking.environment(),
                **tracking.dvc_hashes([paths.prepared]),
            }
        )
        result = train(config, prepared, paths.models / "train", tracker)
        metrics = result.metrics
        reports.write_json(paths.reports / "train.json", metrics)
        reports.write_json(
            result.best_checkpoint.parent / "run.json", {"mlflow_run_id": tracker.run_id, **metrics}
        )
        reports.write_csv(paths.reports / "train_curves.csv", result.curves)
        reports.plot_curves(
            result.curves,
            paths.reports / "train_curves.png",
            f"{config.model.name} on {config.fetch.source}",
        )
        resolved = paths.reports / "config.resolved.yaml"
        resolved.write_text(dump_config(config))
        for path in (
            resolved,
            paths.reports / "train_curves.png",
            paths.reports / "train_curves.csv",
        ):
            tracker.log_artifact(path)
        if config.augment.transforms:
            from cnnops.augment import write_preview

            preview = paths.models / "train" / "augment_preview.png"
            tracker.log_artifact(
                write_preview(config.augment, prepared.x["train"], preview, seed=config.train.seed)
            )
        tracker.log_metrics(metrics, step=metrics["epochs_run"])
    return metrics
