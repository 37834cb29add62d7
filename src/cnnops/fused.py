"""Trials that share the device: `tune.trials_at_once` trials trained together in one process.

    cnnops tune --set tune.trials_at_once=8

A small network leaves most of a GPU idle, and trials in separate processes take turns on it
rather than share it. Here up to K trials train at once on the same batches: each trial's step
is its own net's forward and backward pass, issued on a CUDA stream of its own, and on CUDA the
K steps of a batch are captured as one CUDA graph with a branch per trial, so one replay runs the
trials' kernels side by side. Augmentation is one pass over K copies of the batch, each copy at
its trial's strength. Each trial keeps its own optimizer and schedule, stepped after the replay.

Each trial is the train stage's `Classifier`, built from its params like a trial of its own,
computing its loss, L1, dropout, noise and batch norm with the train stage's code; its best
checkpoint is one `cnnops register` and `cnnops evaluate` read as any other. Optuna's
ask-and-tell drives the K slots: after every epoch each trial reports its validation metric and
is pruned, stops early or finishes, and its slot takes the next trial asked.

Differences from trials run one at a time, all within a study's noise: a trial that joins
mid-study sees the study's epoch order of batches, not its own; its MLflow run has the curves
but not the per-epoch images. A trial stopped by a signal resumes from its last finished epoch,
as one of its own does, and so does one whose process was killed: each trial's state after
every epoch is written by a thread of its own (`RESUME`), so the study never waits on checkpoint
files.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cnnops import runs, tracking, tune
from cnnops.errors import CnnopsError, ConfigError, DataError
from cnnops.graphs import CapturedStep, StepFn
from cnnops.timings import phase

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna

    from cnnops.config import Config
    from cnnops.data.prepare import Prepared
    from cnnops.module import Classifier


RESUME = "last-fused.ckpt"
"""A trial's state at its last finished epoch, written after every epoch off the training thread
and removed when the trial ends (the train stage's `last.ckpt` is Lightning's)."""


def check(config: Config) -> None:
    """Refuse, as a one-line ConfigError, settings that `tune.trials_at_once` > 1 cannot fuse."""
    k = config.tune.trials_at_once
    if k == 1:
        return
    key = f"tune.trials_at_once = {k}"
    t = config.train
    why = None
    if config.model.name != "seed_cnn":
        why = f"only seed CNN trials train at once, and model.name is {config.model.name!r}"
    elif t.strategy == "ddp":
        why = "DDP trials (train.strategy = 'ddp') train one at a time"
    elif t.precision == "16-mixed":
        why = "16-mixed scales each trial's loss on its own; use bf16-mixed or 32"
    elif t.compile or t.cuda_graphs_optimizer is True:
        why = (
            "the trials' step is captured without the optimizers; set train.compile and "
            "cuda_graphs_optimizer to false or auto"
        )
    elif config.augment.transforms:
        from cnnops.augment import resolve
        from cnnops.augment_batched import supports

        if config.augment.engine == "albumentations" or not supports(resolve(config.augment)):
            why = "augmentation must run on the batched engine (augment.engine auto or batched, its transforms only)"
    if why:
        raise ConfigError(f"{key}: {why}; or set it to 1")


# --- one trial in a slot --------------------------------------------------------------------


@dataclass
class Slot:
    """A running trial: its Classifier, optimizer, schedule, MLflow run and epoch records."""

    trial: optuna.Trial
    config: Config
    module: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool
    tracker: Any
    hold: ExitStack
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None
    """The early-stopping reference: the last value that improved by `min_delta`."""
    wait: int = 0
    best_row: dict[str, float] | None = None
    """The best epoch's row: what the checkpoint keeps."""
    best_is_last: bool = False
    """Whether the best epoch is the last one: its weights are the module's own."""
    best_state: dict[str, torch.Tensor] | None = None
    """The best epoch's weights on the CPU, as its snapshot copied them (stale while
    `best_is_last`, until the snapshot of that epoch): the best costs no copy of its own."""

    graphed: bool = False
    """Whether any of its epochs replayed a captured step."""

    def take_snapshot(self) -> dict[str, Any]:
        """The trial as it stands after its last finished epoch, on the CPU: what `RESUME`
        holds. Its weights are also the best ones when that epoch was the best."""
        state = {
            "state_dict": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rows": self.rows,
            "best": self.best,
            "wait": self.wait,
            "best_row": self.best_row,
        }
        snapshot = _clone(state, "cpu")
        if self.best_is_last:
            self.best_state = snapshot["state_dict"]  # never changed after: shared, not copied
        return {**snapshot, "best_state": self.best_state}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a snapshot that `take_snapshot` made and a signal saved."""
        self.module.load_state_dict(saved["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved["scheduler"] is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.rows, self.best, self.wait = list(saved["rows"]), saved["best"], saved["wait"]
        self.best_row = saved["best_row"]
        self.best_state, self.best_is_last = saved["best_state"], False

    @property
    def epoch(self) -> int:
        return len(self.rows)

    def step(self) -> None:
        self.optimizer.step()
        if self.per_step:
            self.scheduler.step()

    def end_epoch(self, row: dict[str, float]) -> str | None:
        """Record an epoch; how the trial ends after it ("pruned", "stopped", "complete"), or
        None to train on. As the train stage's callbacks do: the checkpoint keeps the best
        epoch, early stopping waits for an improvement of `min_delta` and stops on a
        non-finite metric."""
        if not self.per_step and self.scheduler is not None:
            self.scheduler.step()
        self.rows.append(row)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=self.epoch)
        monitor = self.config.tune.metric
        value = row[monitor]
        if not math.isfinite(value):
            return "stopped"
        self.best_is_last = self.best_row is None or _better(value, self.best_row[monitor], monitor)
        if self.best_is_last:
            self.best_row = row
        stop = self.config.train.early_stopping
        delta = stop.min_delta if monitor.endswith("acc") else -stop.min_delta
        if self.best is None or _better(value, self.best + delta, monitor):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        self.trial.report(value, step=self.epoch - 1)
        if self.trial.should_prune():
            return "pruned"
        if stop.enabled and self.wait >= stop.patience:
            return "stopped"
        if self.epoch >= self.config.train.max_epochs:
            return "complete"
        return None


def _better(value: float, than: float, monitor: str) -> bool:
    return value > than if monitor.endswith("acc") else value < than


# --- the study loop -------------------------------------------------------------------------


class Fused:
    """Up to `tune.trials_at_once` trials of `job`'s study training together on one device."""

    def __init__(
        self,
        study: optuna.Study,
        job: tune.Job,
        prepared: Prepared,
        on_trial: Callable[[optuna.Study], None] | None = None,
    ) -> None:
        from cnnops.data.datamodule import BatchIndices
        from cnnops.train import batched_engine, planned_device_type

        self.study, self.job, self.prepared, self.on_trial = study, job, prepared, on_trial
        t = job.config.train
        self.device = torch.device(planned_device_type(t))
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        # As the train stage's Trainer(deterministic=..., benchmark=...) sets them.
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.x, self.y = self._split("train")
        self.val = self._split("val")
        self.batches = BatchIndices(len(self.y), t.batch_size, shuffle=True, seed=t.seed)
        self.slots: list[Slot] = []
        # Each epoch's resume checkpoints, written in order off the training thread; and the
        # trials' MLflow runs, made and fed on a thread of their own.
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cnnops-resume")
        self.recorder = ThreadPoolExecutor(1, thread_name_prefix="cnnops-trial-runs")
        self.writes: list[Future[Any]] = []
        self.stopping = False
        """Whether the study is stopping: what queued work raises then is not raised again."""
        self.strength = torch.ones(0)
        """Each slot's augmentation strength, this epoch: (K,) on the device."""
        self.stepper: CapturedStep | None = None
        """The step captured for the slots' modules (`stepper.module`), kept while they stay."""
        self.retired: CapturedStep | None = None
        """The step before, kept until the next one is captured: the memory pool the study's
        graphs share lives only while a graph captured into it does."""
        k = job.config.tune.trials_at_once
        cuda = self.device.type == "cuda"
        self.streams = [torch.cuda.Stream(self.device) for _ in range(k)] if cuda else []
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        """The memory pool every capture of the study shares: a graph is never replayed
        after the next is captured, so none replays over another's memory."""
        # One engine for every trial: the spec at strength 1, each image scaled by its trial's.
        self.augment = batched_engine(
            job.config.model_copy(
                update={"augment": job.config.augment.model_copy(update={"strength": 1.0})}
            ),
            prepared,
        )
        # Without autocast's weight-cast cache, which a captured step cannot hold.
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
            if t.precision == "bf16-mixed"
            else nullcontext()
        )

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split resident on the device: every step of every trial draws from it."""
        from cnnops.data.datamodule import fits

        array = self.prepared.x[name]
        if not fits(array.nbytes, self.device):
            raise DataError(
                f"tune.trials_at_once = {self.job.config.tune.trials_at_once}: the {name} split "
                f"({array.nbytes / 2**30:.1f} GiB) does not fit on {self.device} beside the "
                "trials; set it to 1"
            )
        x = torch.from_numpy(np.ascontiguousarray(array))
        y = torch.from_numpy(np.asarray(self.prepared.y[name], dtype=np.int64))
        return x.to(self.device), y.to(self.device)

    def run(self) -> None:
        """Take trials until the study has `tune.n_trials` finished ones (or its deadline)."""
        more = True
        with runs.deferred_signals(raise_after=False):
            try:
                while True:
                    while more and len(self.slots) < self.job.config.tune.trials_at_once:
                        trial = tune._next_trial(self.study, self.job)
                        if trial is False:
                            more = False
                        if not trial:
                            break
                        with phase("trials: start"):
                            self.slots.append(self._start(trial))  # type: ignore[arg-type]
                    if not self.slots:
                        if not more:
                            self._drain()
                            return
                        time.sleep(tune.POLL_S)  # the last trials run in another worker
                        continue
                    self._epoch()
            except BaseException as e:
                self._abandon(e)
                raise

    def _start(self, trial: optuna.Trial) -> Slot:
        import lightning as L
        from optuna.storages._heartbeat import get_heartbeat_thread

        from cnnops.train import build_module

        params = tune.sample(trial, self.job.config)
        config = tune.apply(self.job.config, params)
        hold = ExitStack()
        hold.enter_context(get_heartbeat_thread(trial._trial_id, self.study._storage))  # type: ignore[arg-type]
        tracker = None
        try:
            tracker = tracking.OnThread(
                self._record, lambda: tune.trial_run(self.job, trial, params)
            )
            L.seed_everything(config.train.seed, verbose=False)  # a trial of its own starts so
            module = build_module(config, self.prepared).to(self.device)
            if self.device.type == "cuda" and config.train.channels_last:  # as the train stage
                module = module.to(memory_format=torch.channels_last)
            module.total_steps = config.train.max_epochs * len(self.batches)
            module.open_sums("train", "val")  # before a capture that would zero them per replay
            optimizer, scheduler, per_step = _optimizer(module)
            slot = Slot(trial, config, module, optimizer, scheduler, per_step, tracker, hold)
            resume = tune.resume_point(trial, self.job, RESUME)
            if resume is not None:
                from cnnops.checkpoints import load_checkpoint

                slot.restore(load_checkpoint(resume))
                tracker.set_tags({"cnnops.resumed_from": str(resume)})
        except BaseException:
            from optuna.trial import TrialState

            with hold:
                if tracker is not None:
                    self._end_runs([tracker], "failed", "FAILED")
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        return slot

    def _dir(self, slot: Slot) -> Path:
        return tune.trial_dir(self.job, slot.trial.number)

    def _inputs(self, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
        """The batch as each slot's net takes it: augmented in one pass, each trial's copy at its
        own strength, or normalized once for all (every trial normalizes alike)."""
        module, k = self.slots[0].module, len(self.slots)
        if not train or self.augment is None:
            return [module.prepare_input(x, train=False)] * k
        views = self.augment(x.repeat(k, 1, 1, 1), self.strength.repeat_interleave(len(x)))
        return list(module.prepare_input(module.standardize(views), train=False).chunk(k))

    def _vector(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _side_by_side(
        self, work: Callable[[Slot, torch.Tensor], object], inputs: list[torch.Tensor]
    ) -> None:
        """`work(slot, its input)` for every slot, each on a CUDA stream of its own that forks
        from the current stream and joins it again: the trials' kernels overlap, and a capture
        records them as parallel branches of one graph."""
        if self.device.type != "cuda":
            for slot, x in zip(self.slots, inputs, strict=True):
                work(slot, x)
            return
        main = torch.cuda.current_stream(self.device)
        streams = self.streams[: len(self.slots)]
        for slot, x, stream in zip(self.slots, inputs, streams, strict=True):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                work(slot, x)
        for stream in streams:
            main.wait_stream(stream)

    def _epoch(self) -> None:
        """Train every slot one epoch on the same batches, validate, and end what ends."""
        started = time.perf_counter()
        for slot in self.slots:
            slot.module.train()
        step = self._step_for_slots()
        order = self.batches.next_epoch().to(self.device)
        batches = iter(self.batches.split(order))
        if isinstance(step, CapturedStep) and not step.captured:
            with phase("trials: warm-up and capture"):  # the batches until the graph replays
                for idx in batches:
                    self._train_batch(step, idx)
                    if step.captured or step.failed is not None:
                        break
            self.retired = None
        with phase("trials: train steps"):  # queued: the GPU runs them on after
            for idx in batches:
                self._train_batch(step, idx)
        if isinstance(step, CapturedStep) and step.replays:
            for slot in self.slots:
                slot.graphed = True
        with phase("trials: validate"):
            self._validate()
        if self.device.type == "cuda":
            with phase("trials: wait for the GPU"):  # the epoch's sums are read next
                torch.cuda.current_stream(self.device).synchronize()
        with phase("trials: epoch end"):
            self._end_epoch(started)

    def _train_batch(self, step: StepFn, idx: torch.Tensor) -> None:
        signum = runs.pending_signal()
        if signum is not None:
            raise runs.Interrupted(signum)
        if not isinstance(step, CapturedStep):
            for slot in self.slots:
                slot.optimizer.zero_grad(set_to_none=True)
        step(self.x[idx], self.y[idx])
        for slot in self.slots:
            slot.step()

    def _end_epoch(self, started: float) -> None:
        """Each slot's epoch row, report and resume snapshot; the trials that ended, finished."""
        n, n_val = len(self.y), len(self.val[1])
        ended = []
        for slot in self.slots:
            (loss, correct), (val_loss, val_correct) = (
                slot.module.take_sums(s) for s in ("train", "val")
            )
            row = {
                "epoch": slot.epoch + 1,
                "train_loss": round(loss / n, 6),
                "train_acc": round(correct / n, 6),
                "val_loss": round(val_loss / n_val, 6),
                "val_acc": round(val_correct / n_val, 6),
                "lr": slot.optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(time.perf_counter() - started, 4),
            }
            outcome = slot.end_epoch(row)
            if outcome:
                ended.append((slot, outcome))
            else:
                self._write(_save_quietly, slot.take_snapshot(), self._dir(slot) / RESUME)
        for slot, outcome in ended:
            self.slots.remove(slot)
            with phase("trials: finish"):
                self._finish(slot, outcome)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every slot's forward and backward pass on one batch, as the train stage's step
        computes it (its loss and L1 penalty; loss and hits add up in the module's sums).
        Returns the summed loss, detached."""
        losses: list[torch.Tensor] = []

        def train(slot: Slot, inputs: torch.Tensor) -> None:
            with self.autocast:
                loss = slot.module.train_loss(inputs, y)
            loss.backward()
            losses.append(loss.detach())

        self._side_by_side(train, self._inputs(x, train=True))
        return torch.stack(losses).sum()

    def _step_for_slots(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The step of this epoch's slots: the one of the epoch before while they are the same
        trials (its graph stays valid), else a new one. On CUDA (`train.cuda_graphs` not false)
        it is captured as a graph once warm; the optimizers step eagerly, each after it."""
        modules = [s.module for s in self.slots]
        # The same nets in the same slots: the graph of the epoch before still holds.
        if self.stepper is not None and list(self.stepper.module.children()) == modules:
            return self.stepper
        # Made here, not in the step: a capture cannot copy from the host.
        self.strength = self._vector([s.config.augment.strength for s in self.slots])
        t = self.job.config.train
        if self.device.type != "cuda" or t.cuda_graphs is False:
            return self._step
        self.retired = self.retired or self.stepper
        self.stepper = CapturedStep(
            self._step,
            nn.ModuleList(modules),
            # The first capture warms the streams, cuDNN and autograd up; later ones capture at
            # once (a new trial's sums are made when it starts).
            warmup=3 if self.stepper is None else 0,
            generators=getattr(self.augment, "generators", tuple),
            required=t.cuda_graphs is True,
            pool=self.pool,
        )
        return self.stepper

    @torch.no_grad()
    def _validate(self) -> None:
        """Every slot's validation loss and hits, added up in its module's sums."""
        x, y = self.val
        size = self.job.config.evaluate.batch_size
        for slot in self.slots:
            slot.module.eval()
        for start in range(0, len(y), size):
            yb = y[start : start + size]

            def score(slot: Slot, inputs: torch.Tensor, yb: torch.Tensor = yb) -> None:
                with self.autocast:
                    slot.module.batch_loss(inputs, yb, "val")

            self._side_by_side(score, self._inputs(x[start : start + size], train=False))

    def _write(self, fn: Callable[..., object], *args: Any) -> Future[Any]:
        """`fn(*args)` on the writer thread, after every write queued before it."""
        return self._queue(self.writer.submit(fn, *args))

    def _record(self, fn: Callable[[], Any]) -> Future[Any]:
        """`fn()` on the thread of the trials' MLflow runs, after every call queued before it."""
        return self._queue(self.recorder.submit(fn))

    def _queue(self, future: Future[Any]) -> Future[Any]:
        """Keep `future` until it is done; what a finished one raised, raise here (unless the
        study is already stopping on an error of its own)."""
        self.writes.append(future)
        if self.stopping:
            return future
        for done in [w for w in self.writes if w.done()]:
            self.writes.remove(done)
            done.result()
        return future

    def _drain(self, check: bool = True) -> None:
        """Wait for every queued write and MLflow call; raise what the first failed one raised
        (unless not `check`: an error already ends the study)."""
        writes, self.writes = self.writes, []
        wait(writes)
        for write in writes if check else ():
            write.result()

    def _end_runs(self, trackers: list[Any], state: str, status: str) -> None:
        """End these trials' MLflow runs as the study stops, before Optuna is told how they
        ended. From here on what queued work raised (a tracking server gone) is not raised
        again, so one run that cannot close cannot keep the others open; then every write and
        run is waited for, so each run's id is on its trial before the trial ends."""
        self.stopping = True
        for tracker in trackers:
            tune.end_run(tracker, state, status)
        self._drain(check=False)

    def _finish(self, slot: Slot, outcome: str) -> None:
        """Tell Optuna how the trial ended, save its best checkpoint, close its MLflow run."""
        from optuna.trial import TrialState

        from cnnops.train import peak_memory_mb

        study, trial, job = self.study, slot.trial, self.job
        with runs.deferred_signals(raise_after=False), slot.hold:
            try:
                # The run's id rides on the trial, set where the run was made: before it ends.
                slot.tracker.run_id  # noqa: B018
                if outcome == "pruned":
                    tune.end_run(slot.tracker, "pruned", "KILLED")
                    study.tell(trial, state=TrialState.PRUNED)
                elif slot.best_row is None:  # not one epoch with a finite metric
                    tune.end_run(slot.tracker, "failed", "FAILED")
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    checkpoint = _save_best(slot, self._dir(slot))
                    monitor = job.config.tune.metric
                    best = slot.best_row
                    elapsed = time.perf_counter() - slot.started
                    metrics = {
                        "best_epoch": int(best["epoch"]),
                        "best_val_acc": best["val_acc"],
                        "best_val_loss": best["val_loss"],
                        "best_train_acc": best["train_acc"],
                        "epochs_run": slot.epoch,
                        "stopped_early": outcome == "stopped",
                        "stopped_epoch": slot.epoch,
                        "train_seconds": round(elapsed, 2),
                        "device_seconds": round(elapsed, 2),
                        "peak_memory_mb": peak_memory_mb(self.device),
                        "cuda_graphs": slot.graphed,
                        "cuda_graphs_optimizer": False,
                        "data_placement": "device",
                        "trials_at_once": job.config.tune.trials_at_once,
                    }
                    slot.tracker.log_metrics(
                        {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=slot.epoch,
                    )
                    tune.end_run(slot.tracker, "complete", "FINISHED")
                    trial.set_user_attr("metrics", metrics)
                    trial.set_user_attr("checkpoint", str(checkpoint))
                    study.tell(trial, best[monitor])  # NaN: Optuna records the trial as failed
            except BaseException:
                # What failed before Optuna heard how the trial ended (no run could be made, the
                # tracking server gone as the run ends, no room for the checkpoint) fails it: the
                # trial has left the slots, so nothing else would tell it. The error ends the study.
                if not study._storage.get_trial(trial._trial_id).state.is_finished():
                    study.tell(trial, state=TrialState.FAIL)
                raise
        self._write(lambda path: path.unlink(missing_ok=True), self._dir(slot) / RESUME)
        tune._log(study, trial.number, job)
        if self.on_trial:
            self.on_trial(study)

    def _abandon(self, error: BaseException) -> None:
        """Every running trial ends with the loop. On a signal each is failed and queued again,
        its last finished epoch saved for the rerun to resume from; on an error each is failed,
        the error printed once."""
        from optuna.trial import TrialState

        signal = isinstance(error, (runs.Interrupted, KeyboardInterrupt))
        if not signal and not isinstance(error, (SystemExit, CnnopsError)):
            traceback.print_exc()  # a CnnopsError is the command's one line
        with runs.deferred_signals(raise_after=False):
            state, status = ("interrupted", "KILLED") if signal else ("failed", "FAILED")
            self._end_runs([slot.tracker for slot in self.slots], state, status)
            for slot in self.slots:
                with slot.hold:
                    self.study.tell(slot.trial, state=TrialState.FAIL)
                    if signal:
                        frozen = self.study._storage.get_trial(slot.trial._trial_id)
                        tune.on_stale(self.job.config)(self.study, frozen)
            self.slots.clear()


def _clone(obj: Any, device: str | None = None) -> Any:
    """`obj` with every tensor in it copied (to `device`), containers rebuilt, the rest kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if device is None else obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v, device) for v in obj)
    return obj


def _save(checkpoint: dict[str, Any], path: Path) -> Path:
    """`checkpoint` written whole at `path`, as the train stage writes its checkpoints."""
    from cnnops.train import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


def _save_quietly(checkpoint: dict[str, Any], path: Path) -> None:
    """A resume checkpoint: one that cannot be written (a full disk) costs the resume, not the
    study, and says so."""
    try:
        _save(checkpoint, path)
    except OSError as e:
        print(
            f"warning: {path}: not written ({e}); a killed trial would start again", file=sys.stderr
        )


def _optimizer(module: Classifier) -> tuple[torch.optim.Optimizer, Any, bool]:
    """The trial's optimizer and schedule, as the train stage configures them."""
    configured = module.configure_optimizers()
    if isinstance(configured, torch.optim.Optimizer):
        return configured, None, False
    scheduler = configured["lr_scheduler"]
    return configured["optimizer"], scheduler["scheduler"], scheduler["interval"] == "step"


def _save_best(slot: Slot, out: Path) -> Path:
    """The trial's best weights as the train stage's checkpoint: `best.ckpt` in its folder."""
    import lightning as L

    best = slot.best_row
    weights = slot.module.state_dict() if slot.best_is_last else slot.best_state
    assert best is not None and weights is not None
    checkpoint = {
        "state_dict": _clone(weights, "cpu"),
        "hyper_parameters": dict(slot.module.hparams),
        "epoch": int(best["epoch"]) - 1,
        "pytorch-lightning_version": L.__version__,
    }
    return _save(checkpoint, out / "best.ckpt")


def run(
    study: optuna.Study,
    job: tune.Job,
    prepared: Prepared,
    on_trial: Callable[[optuna.Study], None] | None = None,
) -> None:
    with phase("trials: setup"):  # the splits onto the device, the streams, the augmentation
        together = Fused(study, job, prepared, on_trial)
    together.run()
