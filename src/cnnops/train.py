"""The train stage: one `train()` shared by `cnnops train` and every tuning trial."""

from __future__ import annotations

import io
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cnnops import runs
from cnnops.config import Config, Train, Zoo, dump_config, flatten
from cnnops.data.datamodule import ImageData, check_placement
from cnnops.data.prepare import Prepared
from cnnops.errors import ConfigError
from cnnops.module import Classifier
from cnnops.runs import rank_zero
from cnnops.timings import phase
from cnnops.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from cnnops.tracker_process import TrackerProcess

CURVE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


class Curves(Callback):
    """Collects one row of epoch metrics and hands it to the tracker: one GPU sync per epoch.
    `epoch_seconds` is the epoch's training and validation, up to that sync (checkpoints and
    records excluded): the steady-state throughput is images / epoch_seconds."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.rows: list[dict[str, float]] = []
        self.started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = {**trainer.callback_metrics, **module.epoch_metrics("train")}  # type: ignore[operator]
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        row.update({k: round(float(metrics[k]), 6) for k in CURVE_KEYS if k in metrics})
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        row["epoch_seconds"] = round(time.perf_counter() - self.started, 4)
        self.rows.append(row)
        if trainer.is_global_zero:
            self.tracker.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )

    # The rows so far ride in every checkpoint: a resumed run reports the whole curve.
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: a killed run never leaves a torn file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        runs.write_bytes(Path(path), buffer.getvalue())


class StopOnSignal(Callback):
    """SIGTERM and SIGINT (held by `runs.deferred_signals` during fit) stop training at a batch
    boundary. DDP ranks vote at every batch end without waiting for the vote: the one cast
    `LAG` batches earlier decides (any rank signalled stops them all), so every rank leaves
    after the same batch, the last checkpoint is whole, and no step waits on the host for the
    GPU to catch up (a blocking vote per step stalled the launch queue)."""

    LAG = 2

    def __init__(self) -> None:
        self.votes: deque[Callable[[], int]] = deque()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        stop = runs.pending_signal() is not None
        if trainer.world_size > 1:
            stop = self._vote(trainer.strategy.root_device, stop)
        if stop:
            trainer._signal_connector.received_sigterm = True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        while self.votes:  # every collective started is finished before the process group goes
            self.votes.popleft()()

    def _vote(self, device: torch.device, stop: bool) -> bool:
        import torch.distributed as dist

        # A fill on the device, not a copy from the host (that would wait for the queue).
        flag = torch.full((1,), int(stop), dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if device.type == "cuda":
            work.wait()  # NCCL: the stream waits for the collective, the host does not
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

            def result() -> int:
                done.synchronize()  # recorded LAG batches ago: long done, unless the GPU lags
                return int(host.item())

        else:

            def result() -> int:
                work.wait()
                return int(flag.item())

        self.votes.append(result)
        if len(self.votes) <= self.LAG:
            return False
        return bool(self.votes.popleft()())


class QuietSignalConnector(_SignalConnector):
    """Lightning's own SIGTERM handler runs a collective inside the handler, which races the
    collectives DDP has in flight (gloo aborts on the mismatch). Signals stay with `runs`;
    `StopOnSignal` turns them into Lightning's stop at a batch boundary."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, Any]
    curves: list[dict[str, float]] = field(default_factory=list)


def build_module(config: Config, prepared: Prepared, pretrained: bool = True) -> Classifier:
    """The LightningModule for `config` on `prepared`, holding the pretrained weights
    `model.weights` names unless `pretrained` is false (a resumed run has its own)."""
    from cnnops.models import normalization

    channels, size, _ = prepared.shape
    spec = config.model
    mean, std = normalization(spec, channels, prepared.mean, prepared.std)
    module = Classifier(
        model=spec.model_dump(mode="json"),
        train=config.train.model_dump(mode="json"),
        in_channels=channels,
        num_classes=len(prepared.classes),
        image_size=size,
        mean=mean,
        std=std,
        classes=prepared.classes,
        config=config.model_dump(mode="json"),
    )
    if pretrained and isinstance(spec, Zoo) and spec.weights is not None:
        from cnnops.models.zoo import load_pretrained

        if channels not in (1, 3):
            raise ConfigError(
                f"model.weights = {spec.weights.as_posix()!r}: ImageNet weights take 1 or 3 "
                f"channels, the prepared images have {channels}"
            )
        load_pretrained(module.net, spec.name, spec.weights, spec.weights_sha256)
    return module


class SameStreamDDP(DDPStrategy):
    """Lightning's DDP, with the model wrapped on the stream its steps run on. Lightning wraps
    it on a side stream; the gradient accumulators DDP keeps then belong to that stream, and
    every backward pass synchronizes across the two (PyTorch warns of the mismatch on every
    rank). On 4 H100s the throughput of ResNet-50 was the same either way (2.93x against
    2.87x one GPU's); the warning and the extra waits are gone."""

    def _setup_model(self, model: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        ids = self.determine_ddp_device_ids()
        return DistributedDataParallel(module=model, device_ids=ids, **self._ddp_kwargs)


def _strategy(t: Train) -> Any:
    if t.strategy != "ddp":
        return t.strategy
    # Gradients are views into DDP's all-reduce buckets: no copy into the buckets per step.
    return SameStreamDDP(gradient_as_bucket_view=True)


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


def use_cuda_graphs(t: Train, trainer: L.Trainer, unfreeze_epoch: int | None = None) -> bool:
    """Whether `train.cuda_graphs` (auto or true) applies to this trainer; true where it cannot
    is a ConfigError naming the reason."""
    if t.cuda_graphs is False:
        return False
    if unfreeze_epoch is not None:
        why = f"model.unfreeze_epoch = {unfreeze_epoch} changes what a step computes mid-run"
    elif trainer.strategy.root_device.type != "cuda":
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


def planned_device_type(t: Train) -> str:
    """The kind of device a Trainer for `t` will train on, known before building one."""
    if t.accelerator in ("cpu", "mps"):
        return t.accelerator
    if t.accelerator in ("gpu", "cuda") or torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


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
    resume: Path | None = None,
) -> TrainResult:
    """Train `config.model` on `prepared`; checkpoints land in `out_dir`: best.ckpt, and
    last.ckpt at the end of every epoch. `resume` (a last.ckpt) continues that run where it
    stopped: weights, optimizer, schedule, early stopping, epoch, curves and random state.

    SIGTERM or SIGINT stops training at the next batch and raises `runs.Interrupted`."""
    t = config.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    tracker = tracker or NullTracker()
    monitor = t.early_stopping.monitor
    mode = "max" if monitor.endswith("acc") else "min"
    curves = Curves(tracker)
    # Both save at the end of each training epoch, after `curves` has its row (Lightning runs
    # checkpoint callbacks last): a checkpoint always holds the whole curve up to its epoch.
    best_ckpt = ModelCheckpoint(
        dirpath=out_dir,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=out_dir, filename="last", save_on_train_epoch_end=True, enable_version_counter=False
    )
    from cnnops.epoch_images import EpochImages

    all_callbacks: list[Callback] = [
        curves,
        best_ckpt,
        last,
        StopOnSignal(),
        EpochImages(tracker),
        *(callbacks or []),
    ]
    if t.early_stopping.enabled:
        stopper = EarlyStopping(
            monitor=monitor,
            mode=mode,
            patience=t.early_stopping.patience,
            min_delta=t.early_stopping.min_delta,
        )
        all_callbacks.append(stopper)
    with phase("trainer setup"):
        trainer = L.Trainer(
            max_epochs=t.max_epochs,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=_strategy(t),
            sync_batchnorm=t.sync_batchnorm,
            precision=_precision(t.precision),
            deterministic=t.deterministic,
            logger=False,
            callbacks=all_callbacks,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=out_dir,
            num_sanity_val_steps=0,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            # cuDNN autotuning costs seconds of warm-up that short runs never earn back.
            benchmark=t.cudnn_benchmark,
        )
        trainer._signal_connector = QuietSignalConnector(trainer)
        # A setting that cannot apply fails before any output goes.
        graphs = use_cuda_graphs(t, trainer, getattr(config.model, "unfreeze_epoch", None))
        check_placement(t.data_placement, trainer.strategy.root_device.type)
        module = build_module(config, prepared, pretrained=resume is None)
        if t.channels_last and torch.cuda.is_available() and t.accelerator != "cpu":
            # NHWC convolutions on tensor cores
            module = module.to(memory_format=torch.channels_last)
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
            placement=t.data_placement,
        )
    started = time.perf_counter()
    # Signals wait for a batch boundary (StopOnSignal), then stop as Lightning stops on SIGTERM.
    with runs.deferred_signals(raise_after=False), phase("fit"):
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        except SIGTERMException:
            raise runs.Interrupted(runs.pending_signal() or signal.SIGTERM) from None
        runs.clear_pending()  # training finished: a signal during its last moments is moot
    elapsed = time.perf_counter() - started
    peak_mb = peak_memory_mb(trainer.strategy.root_device)
    if trainer.is_global_zero and config.augment.transforms:
        # Written after fit: Lightning warns about a non-empty checkpoint folder before it.
        save_pipeline(config, prepared, out_dir)
    best = best_row(curves.rows, monitor)
    placement = data.placements.get("train", t.data_placement)  # what auto resolved to
    if trainer.is_global_zero:
        tracker.set_tags({"cnnops.data_placement": placement})
    metrics = {
        "best_epoch": int(best.get("epoch", 0)),
        "best_val_acc": best.get("val_acc"),
        "best_val_loss": best.get("val_loss"),
        "best_train_acc": best.get("train_acc"),
        "epochs_run": len(curves.rows),
        "stopped_early": bool(trainer.should_stop and len(curves.rows) < t.max_epochs),
        "stopped_epoch": len(curves.rows),
        "train_seconds": round(elapsed, 2),
        # What the run occupied: seconds x devices, and this rank's peak memory (device memory
        # on a GPU, the process's resident set on a CPU).
        "device_seconds": round(elapsed * trainer.world_size, 2),
        "peak_memory_mb": peak_mb,
        # Whether the training steps ran as a captured CUDA graph (train.cuda_graphs).
        "cuda_graphs": module.graph_step is not None and module.graph_step.captured,
        # ... and the optimizer's update with them (train.cuda_graphs_optimizer).
        "cuda_graphs_optimizer": module.graph_optimizer is not None
        and module.graph_step is not None
        and module.graph_step.captured,
        # Where the training split was read from (train.data_placement, auto resolved).
        "data_placement": placement,
    }
    return TrainResult(out_dir / "best.ckpt", out_dir / "last.ckpt", metrics, curves.rows)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated on `device` when it is a GPU, else RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def save_pipeline(config: Config, prepared: Prepared, out_dir: Path) -> Path:
    """The exact training transforms, serialized by Albumentations, beside the checkpoints."""
    from cnnops.augment import build_transforms, save_transforms

    path = out_dir / "transforms.json"
    shape = prepared.shape[1:]
    save_transforms(build_transforms(config.augment, True, shape, seed=config.train.seed), path)
    return path


def quiet_lightning() -> None:
    """Keep Lightning's start-up banners and tips out of a stage's output (and DVC's logs)."""
    import logging
    import warnings

    # Lightning sets its own log level when imported; this module has imported it already.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(on_after_batch_transfer|LeafSpec).*")
    # The run's own folder: it holds the run's state and, on resume, its earlier checkpoints.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    # A frozen pretrained backbone keeps its batch norm layers in eval mode on purpose.
    warnings.filterwarnings("ignore", message="Found .* module.* in eval mode at the start")


def train_stage(config: Config, mlflow: TrackerProcess | None = None) -> dict[str, Any]:
    """`cnnops train`: train into `models/train.partial`, resuming an interrupted run of the same
    config and data there; when it finishes, replace `models/train`, write the reports and
    close the MLflow run (the same run across resumes). `mlflow`: a tracker process already
    warming up, to record the run from; otherwise MLflow is called from this process."""
    from cnnops import tracking
    from cnnops.data import prepare

    quiet_lightning()
    runs.die_with_parent()  # `dvc repro` killed: stop too, resumable, instead of training on
    paths = config.paths
    # A placement that cannot work fails before any output goes (the MLflow run included).
    check_placement(config.train.data_placement, planned_device_type(config.train))
    out = paths.models / "train"
    # Memory-mapped: the disk placement streams from it; the others read it into memory once.
    with phase("data"):
        prepared = prepare.load(paths.prepared, mmap=True)
    fingerprint = runs.fingerprint(dump_config(config), [paths.prepared])
    if not rank_zero():  # DDP re-launches this command per rank; rank 0 owns every output
        work = out.with_name(out.name + ".partial")
        found = runs.read_json(work / runs.Staging.STATE) or {}
        resume = work / "last.ckpt" if found.get("fingerprint") == fingerprint else None
        return train(config, prepared, work, resume=_existing(resume)).metrics
    with runs.exclusive(out, "cnnops train"):
        staging = runs.Staging(out, "train", fingerprint)
        resume = _existing(staging.work / "last.ckpt")
        done = _epoch_of(resume) if resume else 0
        stale = (staging.previous or {}).get("mlflow_run_id")
        if stale and not staging.resumable:  # a killed run of other settings: it ends here
            ended = {"cnnops.ended": "superseded"}
            if mlflow is None:
                tracking.end_run(config.mlflow, stale, "KILLED", ended)
            else:
                mlflow.end_run(stale, "KILLED", ended)
        run_id = staging.state.get("mlflow_run_id") if staging.resumable else None
        tags = {"cnnops.stage": "train"}
        with phase("mlflow: open"):
            tracker: tracking.MlflowTracker | TrackerProcess = (
                tracking.MlflowTracker(config.mlflow, "train", tags=tags, run_id=run_id)
                if mlflow is None
                else mlflow.open("train", tags=tags, run_id=run_id)
            )
        with tracker:
            with phase("mlflow: params and tags"):
                if tracker.run_id != run_id:  # a new run
                    tracker.log_params(flatten(config))
                    tracker.set_tags(
                        {
                            "git.commit": tracking.git_commit(),
                            **tracking.environment(),
                            **tracking.dvc_hashes([paths.prepared]),
                        }
                    )
                if done:
                    tracker.set_tags({"cnnops.resumed_after_epoch": str(done)})
            staging.update(mlflow_run_id=tracker.run_id)
            try:
                result = train(config, prepared, staging.work, tracker, resume=resume)
            except runs.Interrupted as e:
                e.detail = _resume_hint(staging.work / "last.ckpt")
                raise
            with runs.deferred_signals(), phase("publish"):  # all or nothing changes
                _publish(config, prepared, result, staging, tracker)
    return result.metrics


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def _epoch_of(checkpoint: Path) -> int:
    """Epochs finished in `checkpoint`; an unreadable one is a DataError naming it."""
    from cnnops.checkpoints import load_checkpoint

    return int(load_checkpoint(checkpoint).get("epoch", -1)) + 1


def _resume_hint(last: Path) -> str:
    if not last.is_file():
        return "no epoch had finished; rerun `cnnops train` to start over"
    return (
        f"rerun `cnnops train` (or `dvc repro`) to resume after epoch {_epoch_of(last)} from {last}"
    )


def _publish(
    config: Config, prepared: Prepared, result: TrainResult, staging: runs.Staging, tracker: Any
) -> None:
    """Swap the finished run in for `models/train`, then write and log the reports."""
    from cnnops import reports

    paths, metrics = config.paths, result.metrics
    out = staging.out
    reports.write_json(staging.work / "run.json", {"mlflow_run_id": tracker.run_id, **metrics})
    if config.augment.transforms:  # into the run's folder before it is committed, as its own
        from cnnops.augment import write_preview

        write_preview(
            config.augment,
            prepared.x["train"],
            staging.work / "augment_preview.png",
            seed=config.train.seed,
        )
    staging.commit()
    reports.write_json(paths.reports / "train.json", metrics)
    reports.write_csv(paths.reports / "train_curves.csv", result.curves)
    reports.plot_curves(
        result.curves,
        paths.reports / "train_curves.png",
        f"{config.model.name} on {config.fetch.source}",
    )
    resolved = paths.reports / "config.resolved.yaml"
    resolved.write_text(dump_config(config))
    for path in (resolved, paths.reports / "train_curves.png", paths.reports / "train_curves.csv"):
        tracker.log_artifact(path)
    if config.augment.transforms:
        tracker.log_artifact(out / "transforms.json")
        tracker.log_artifact(out / "augment_preview.png")
    tracker.log_metrics(metrics, step=metrics["epochs_run"])
