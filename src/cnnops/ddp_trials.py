"""Tuning trials trained with DDP: `train.strategy: ddp` and `train.devices: N` in a study.

A tune worker is rank 0 of its own group of N processes. It starts the other ranks once
(`python -m cnnops.ddp_trials JOB`), with the environment a launcher such as torchrun gives,
so every trial's Trainer finds its process group made and launches nothing itself. Rank 0 alone
talks to Optuna, MLflow and the study's storage: it asks for a trial, then broadcasts what the
trial trains (its lever values, folder and resume point) to the other ranks; every rank trains
it together. Pruning is decided on rank 0 and broadcast after each validation, so every rank
stops after the same epoch.

The other ranks end with their worker: when it has no more trials it tells them so, and the
kernel stops them if it dies (`runs.die_with_parent`).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from cnnops import runs
from cnnops.config import Config
from cnnops.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from cnnops.tune import Job


def world_size(config: Config) -> int:
    """How many processes train each trial: 1, or train.devices under strategy ddp."""
    t = config.train
    if t.strategy != "ddp":
        return 1
    if not isinstance(t.devices, int):
        raise ConfigError(
            "train.devices = 'auto' with train.strategy = 'ddp' in a study: set the number of "
            "devices each trial trains on (1 to the devices here)"
        )
    return t.devices


class Pruning(Callback):
    """Optuna pruning that works under DDP: rank 0 reports the monitored metric after each
    validation and asks the pruner; the answer is broadcast, and every rank stops after this
    epoch when it is yes. `pruned_at` is then that epoch (rank 0 raises TrialPruned after fit:
    an exception inside fit on one rank would leave the others waiting)."""

    def __init__(self, trial: optuna.Trial | None, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            score = trainer.callback_metrics.get(self.monitor)
            if score is None:
                raise ConfigError(f"tune.metric = {self.monitor!r} is not a validation metric")
            self.trial.report(float(score), step=trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


@dataclass(frozen=True)
class Task:
    """What every rank trains next: a trial's lever values, its folder and resume point."""

    params: dict[str, Any]
    out: Path
    resume: Path | None


class Ranks:
    """Rank 0's side: the other ranks of this worker's group, and the channel to them."""

    def __init__(self, job: Job, size: int) -> None:

        from cnnops.train import planned_device_type

        self.size = size
        cuda = planned_device_type(job.config.train) == "cuda"
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(size),
            "NODE_RANK": "0",
        }
        env.update(RANK="0", LOCAL_RANK="0")
        self.saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.job_file: Path | None = None
        self.closing = False
        try:
            # The job crosses as a pickle in a private file: it holds the whole config.
            fd, name = tempfile.mkstemp(prefix="cnnops-ddp-", suffix=".pkl")
            self.job_file = Path(name)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(job, f)
            for r in range(1, size):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "cnnops.ddp_trials", name],
                        env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)},
                    )
                )
            self.control = _join_group(0, size, cuda)
            threading.Thread(target=self._watch, daemon=True, name="ddp-ranks").start()
        except BaseException:  # no group: the ranks started go, and so do the env and the job
            import torch.distributed as dist

            for p in self.procs:
                p.kill()
            self._release(wait_s=10)
            if dist.is_initialized():  # joined, but its control group failed
                dist.destroy_process_group()
            raise

    def send(self, task: Task | None) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([task], src=0, group=self.control)

    def close(self, failed: bool = False) -> None:
        """Tell the other ranks there is no more work, and wait for them to leave. After a
        failure they may be waiting inside a trial, where no message reaches them: they go."""
        import torch.distributed as dist

        self.closing = True
        try:
            if failed:
                for p in self.procs:
                    p.kill()
            else:
                self.send(None)
        finally:
            self._release(wait_s=60)
            dist.destroy_process_group()

    def failure(self) -> str | None:
        """What ended another rank, if one has ended (the line the watchdog prints)."""
        for rank, p in enumerate(self.procs, start=1):
            try:
                code = p.wait(timeout=2)  # a rank that broke the group is gone, or soon is
            except subprocess.TimeoutExpired:
                continue
            return (
                f"rank {rank} of this worker's DDP group exited with status {code}; "
                "the worker stops (rerun `cnnops tune` to resume its trial)"
            )
        return None

    def _watch(self) -> None:
        """A rank that dies leaves the others waiting in a collective for the group's timeout
        (tens of minutes): this worker stops at once instead. Its trial stays RUNNING and is
        recovered, from its last checkpoint, when `cnnops tune` runs again."""
        while not self.closing:
            for p in self.procs:
                code = p.poll()
                # A signal to the whole group stops every rank in step: that is no failure.
                if code is not None and not self.closing and runs.pending_signal() is None:
                    print(f"cnnops tune: {self.failure()}", file=sys.stderr, flush=True)
                    os._exit(1)
            time.sleep(0.5)

    def _release(self, wait_s: float) -> None:
        """Wait up to `wait_s` for each other rank (then kill it), delete the job file and put
        back the environment this process had."""
        for p in self.procs:
            try:
                p.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.job_file is not None:
            self.job_file.unlink(missing_ok=True)
        for k, v in self.saved_env.items():  # later Trainers here launch their own ranks
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join_group(rank: int, size: int, cuda: bool) -> Any:
    """Join the worker's process group; return a gloo group for the messages between trials
    (host-side: they never wait on the GPU's streams)."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    return dist.new_group(backend="gloo")


def follow(job_file: Path) -> None:
    """A rank other than 0: train each task rank 0 broadcasts, until it sends None."""
    import torch.distributed as dist

    from cnnops import tune
    from cnnops.data import prepare
    from cnnops.train import planned_device_type, train

    runs.die_with_parent()
    with job_file.open("rb") as f:
        job: Job = pickle.load(f)
    tune.quiet()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    control = _join_group(rank, size, planned_device_type(job.config.train) == "cuda")
    prepared = prepare.load(job.config.paths.prepared)
    while True:
        box: list[Task | None] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        task = box[0]
        if task is None:
            break
        config = tune.apply(job.config, task.params)
        train(
            config,
            prepared,
            task.out,
            callbacks=[Pruning(None, config.tune.metric)],
            resume=task.resume,
        )
    dist.destroy_process_group()


def main() -> None:
    with runs.interruptible():
        try:
            follow(Path(sys.argv[1]))
        except runs.Interrupted as e:
            sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
