"""The tune stage: an Optuna study over the regularization levers, each trial the same `train()`.

    cnnops tune --workers 2 --set tune.n_trials=20

Workers take trials with ask/tell under a study-wide lock (see `cnnops.studies`), so together
they finish exactly `tune.n_trials` trials, however many workers run and however often the
stage is interrupted and rerun.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops import progress, runs, studies
from cnnops.config import LEVERS, LOG_SCALE, Config
from cnnops.errors import CnnopsError
from cnnops.timings import phase

if TYPE_CHECKING:
    import optuna

    from cnnops.data.prepare import Prepared
    from cnnops.ddp_trials import Ranks

POLL_S = 2.0
BASELINE_KEY = "cnnops.baseline"  # user attribute of the trial that runs params' own values


def active_levers(config: Config) -> dict[str, Any]:
    """The levers with a range that the model honours (augmentation strength only when there
    are transforms to scale)."""
    space = config.tune.space.model_dump()
    # A dial that changes nothing would only add noise to the sampler and the importances:
    # a lever the model does not honour, or augmentation strength with nothing to scale.
    levers = config.model.levers - (set() if config.augment.transforms else {"augment_strength"})
    return {k: v for k, v in space.items() if v is not None and k in levers}


def sample(trial: optuna.Trial, config: Config) -> dict[str, Any]:
    """Draw one value per active lever."""
    params: dict[str, Any] = {}
    for name, choices in active_levers(config).items():
        if isinstance(choices, list):
            params[name] = trial.suggest_categorical(name, choices)
        else:
            params[name] = trial.suggest_float(name, *choices, log=name in LOG_SCALE)
    return params


def baseline(config: Config) -> dict[str, Any]:
    """The active levers' values as `config` sets them, where they lie inside their ranges."""
    data = config.model_dump(mode="json")
    values: dict[str, Any] = {}
    for name, choices in active_levers(config).items():
        value = data
        for key in LEVERS[name].split("."):
            value = value[key]
        inside = (
            value in choices if isinstance(choices, list) else choices[0] <= value <= choices[1]
        )
        if inside:
            values[name] = value
    return values


def apply(config: Config, params: dict[str, Any]) -> Config:
    """`config` with the lever values set, revalidated like params.yaml."""
    data = config.model_dump(mode="json")
    for name, value in params.items():
        *parents, leaf = LEVERS[name].split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    # The trial stops early and keeps its checkpoint on the very metric the study optimizes.
    data["train"]["early_stopping"]["monitor"] = config.tune.metric
    return Config.model_validate(data)


@dataclass(frozen=True)
class Job:
    """What a worker needs; picklable, so it crosses into spawned worker processes."""

    config: Config
    study: str
    storage: str
    parent_run_id: str | None = None
    worker: int = 0
    workers: int = 1
    deadline: float | None = None


def trial_dir(job: Job, number: int) -> Path:
    # Outside the stage's DVC outs, so trials of an interrupted study survive the rerun.
    return job.config.paths.models / "optuna" / job.study / f"trial-{number}"


def trial_run(job: Job, trial: optuna.Trial, params: dict[str, Any]) -> Any:
    """The trial's MLflow run, nested under the study's run (a NullTracker without one), with
    the lever values as params."""
    from cnnops import tracking

    tracker: Any = tracking.NullTracker()
    if job.parent_run_id:
        tags = {
            "cnnops.stage": "tune",
            "optuna.study": job.study,
            "optuna.trial": str(trial.number),
        }
        try:
            # Trials trained at once share a process and a device: the study's run samples them.
            tracker = tracking.MlflowTracker(
                job.config.mlflow,
                f"trial-{trial.number}",
                parent_run_id=job.parent_run_id,
                tags=tags,
                system_metrics=job.config.tune.trials_at_once == 1,
            )
        except Exception as e:  # the server went away mid-study: one line, the study is kept
            if type(e).__name__ != "MlflowException" or tracking.refusal(e) is not None:
                raise  # a refusal (401, 403) is one line of its own at the command
            raise tracking.TrackingError(
                f"{tracking.uri_source(job.config.mlflow)}: trial {trial.number}'s MLflow run "
                f"could not be made ({tracking.first_line(e)}); the study's finished trials are "
                "kept: rerun `cnnops tune` when the server answers"
            ) from None
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
    tracker.log_params({f"hp.{k}": v for k, v in params.items()})
    return tracker


@contextmanager
def child_run(job: Job, trial: optuna.Trial, params: dict[str, Any]) -> Iterator[Any]:
    """One MLflow run per trial, nested under the study's run, tagged with how the trial ended."""
    import optuna

    tracker = trial_run(job, trial, params)
    try:
        yield tracker
    except optuna.TrialPruned:
        end_run(tracker, "pruned", "KILLED")
        raise
    except runs.Interrupted:
        end_run(tracker, "interrupted", "KILLED")
        raise
    except BaseException:
        end_run(tracker, "failed", "FAILED")
        raise
    end_run(tracker, "complete", "FINISHED")


def end_run(tracker: Any, state: str, status: str) -> None:
    tracker.set_tags({"optuna.state": state})
    tracker.close(status)


def objective(
    trial: optuna.Trial, job: Job, prepared: Prepared, ranks: Ranks | None = None
) -> float:
    """Sample the levers, train with them through the train stage's `train()`, score on val.
    A retry of an interrupted trial resumes from that trial's last checkpoint. With DDP trials
    `ranks` are the worker's other processes: they train the same trial alongside."""
    import optuna

    from cnnops.ddp_trials import Pruning, Task
    from cnnops.train import train

    metric = job.config.tune.metric
    params = sample(trial, job.config)
    config = apply(job.config, params)
    resume = resume_point(trial, job)
    out = trial_dir(job, trial.number)
    with child_run(job, trial, params) as tracker:
        if resume is not None:
            tracker.set_tags({"cnnops.resumed_from": str(resume)})
        if ranks is not None:
            ranks.send(Task(params, out, resume))
        pruning = Pruning(trial, monitor=metric)
        result = train(config, prepared, out, tracker, [pruning], resume=resume)
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at + 1}")
        if config.augment.transforms:
            tracker.log_artifact(out / "transforms.json")
        tracker.log_metrics(result.metrics, step=result.metrics["epochs_run"])
    result.last_checkpoint.unlink(missing_ok=True)
    trial.set_user_attr("metrics", result.metrics)
    trial.set_user_attr("checkpoint", str(result.best_checkpoint))
    value = result.metrics[f"best_{metric}"]
    if value is None:
        raise RuntimeError(f"the trial logged no {metric}")
    return float(value)


def resume_point(trial: optuna.Trial, job: Job, name: str = "last.ckpt") -> Path | None:
    """The last checkpoint (`name`) of the latest earlier attempt of this trial's params, if any."""
    frozen = trial.study.get_trials(deepcopy=False)[trial.number]
    for number in reversed(frozen.system_attrs.get("retry_history", [])):
        last = trial_dir(job, number) / name
        if last.is_file():
            return last
    return None


def on_stale(config: Config) -> Callable[[Any, Any], None]:
    """What happens to a dead worker's trial: re-enqueued with its params, its MLflow run failed."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from cnnops import tracking

    retry = RetryHeartbeatStaleTrialCallback(max_retry=studies.MAX_RETRY)

    def handle(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracking.end_run(config.mlflow, run_id, "FAILED", {"optuna.state": "failed"})

    return handle


def open_study(job: Job) -> optuna.Study:
    import optuna

    tune = job.config.tune
    storage = studies.open_storage(job.storage, on_stale(job.config))
    study = optuna.create_study(
        study_name=job.study,
        storage=storage,
        pruner=_pruner(job.config),
        direction=tune.goal,
        load_if_exists=True,
    )
    # A distinct seed per worker and per rerun: no two of them replay the same random draws.
    seed = tune.sampler.seed + 10007 * job.worker + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=tune.sampler.startup_trials
    )
    return study


def _pruner(config: Config) -> optuna.pruners.BasePruner:
    import optuna

    p = config.tune.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(p.warmup_epochs, 1), reduction_factor=3
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(p.warmup_epochs, 1), max_resource=config.train.max_epochs
        )
    return optuna.pruners.NopPruner()


def counts(study: optuna.Study) -> dict[str, int]:
    from collections import Counter

    found = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    return {k: found.get(k, 0) for k in ("complete", "pruned", "fail", "running", "waiting")}


def _next_trial(study: optuna.Study, job: Job) -> optuna.Trial | None | bool:
    """Under the study lock: a new trial, None to wait for others, or False when done."""
    n = job.config.tune.n_trials
    with studies.study_lock(job.storage, job.study, job.config.paths.models / "optuna"):
        studies.recover(study, on_stale(job.config))
        c = counts(study)
        finished = c["complete"] + c["pruned"]
        if finished >= n or (job.deadline and time.time() > job.deadline):
            return False
        if c["fail"] > n:
            raise CnnopsError(f"study {job.study}: {c['fail']} trials failed; see the errors above")
        if finished + c["running"] >= n:
            return None  # the last trials are running elsewhere; wait in case a worker dies
        if job.config.tune.start_from_params and not study.get_trials(deepcopy=False):
            study.enqueue_trial(baseline(job.config), user_attrs={BASELINE_KEY: True})
        trial = study.ask()
        trial.set_user_attr(studies.OWNER_KEY, studies.owner())
        return trial


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    job: Job,
    prepared: Prepared,
    ranks: Ranks | None = None,
) -> None:
    """Run one trial and record how it ended: complete, pruned, or failed (never disguised).
    A failed DDP trial also ends its worker: the other ranks may be waiting inside it."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses
    from optuna.trial import TrialState

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial, job, prepared, ranks)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            shutil.rmtree(trial_dir(job, trial.number), ignore_errors=True)
            return
        except Exception as e:
            from cnnops.tracking import TrackingError

            lost = isinstance(e, TrackingError)  # the tracking server went away: the study stops
            death = ranks.failure() if ranks is not None else None
            if death is None and not lost:
                traceback.print_exc()
            study.tell(trial, state=TrialState.FAIL)
            if death is not None:  # not the trial's fault: it runs again, from its checkpoint
                on_stale(job.config)(study, study.trials[trial.number])
            if lost:
                raise  # one line at the command; the rerun goes on with the study
            if ranks is not None:
                error = death or f"trial {trial.number} failed on rank 0 of its DDP group"
                raise CnnopsError(error) from None
            return
        except BaseException:  # a signal: the trial runs again, from its last checkpoint
            with runs.deferred_signals(raise_after=False):
                study.tell(trial, state=TrialState.FAIL)
                on_stale(job.config)(study, study.trials[trial.number])
            raise
    study.tell(trial, value)  # a NaN value is recorded as FAIL by Optuna


def run_worker(job: Job, on_trial: Callable[[optuna.Study], None] | None = None) -> None:
    """Take trials until the study has `n_trials` finished ones (or the deadline passes)."""
    import torch

    from cnnops.data import prepare
    from cnnops.ddp_trials import Ranks, world_size

    quiet()
    size = world_size(job.config)
    if job.workers > 1:
        pin_gpus(job.worker, size)
        # share the CPU cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (job.workers * size)))
    study = open_study(job)
    with phase("trials: data"):
        prepared = prepare.load(job.config.paths.prepared)
    if job.config.tune.trials_at_once > 1:
        from cnnops import fused

        fused.run(study, job, prepared, on_trial)
        return
    ranks = Ranks(job, size) if size > 1 else None
    finished = False
    try:
        while (trial := _next_trial(study, job)) is not False:
            if trial is None:
                time.sleep(POLL_S)
                continue
            run_trial(study, trial, job, prepared, ranks)  # type: ignore[arg-type]
            _log(study, trial.number, job)  # type: ignore[union-attr]
            if on_trial:
                on_trial(study)
        finished = True
    finally:
        if ranks is not None:
            ranks.close(failed=not finished)


def _log(study: optuna.Study, number: int, job: Job) -> None:
    """One line per trial for logs; a terminal has the progress bar instead."""
    if progress.shown():
        return
    t = study.get_trials(deepcopy=False)[number]
    value = f" {job.config.tune.metric}={t.value:.5g}" if t.value is not None else ""
    steps = f" after {len(t.intermediate_values)} epochs" if t.state.name == "PRUNED" else ""
    print(
        f"worker {job.worker}: trial {number} {t.state.name.lower()}{value}{steps}",
        file=sys.stderr,
        flush=True,
    )


def quiet() -> None:
    import warnings

    import optuna

    from cnnops.train import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if progress.shown():  # the progress bar says it all
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def pin_gpus(worker: int, per_worker: int = 1) -> None:
    """On a host with several GPUs, worker i gets the i-th group of `per_worker` GPUs (wrapping
    round when there are fewer groups than workers); with one GPU, all workers share it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        # Counted through NVML when possible, so CUDA stays uninitialized in this process.
        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    gpus = [g for g in visible.split(",") if g.strip()]
    groups = [gpus[i : i + per_worker] for i in range(0, len(gpus) - per_worker + 1, per_worker)]
    if len(gpus) > 1 and groups:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(groups[worker % len(groups)])


def _worker_process(job: Job) -> None:
    """A spawned worker: stops with its parent, and on a signal like `cnnops tune` itself."""
    runs.die_with_parent()
    with runs.interruptible():
        try:
            run_worker(job)
        except runs.Interrupted as e:
            sys.exit(e.exit_code)


def run_workers(job: Job, workers: int, on_poll: Callable[[], None]) -> None:
    """`workers` processes on this machine (sharing its GPU, if any) work on one study."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    procs = [
        ctx.Process(target=_worker_process, args=(replace(job, worker=i, workers=workers),))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            on_poll()
            time.sleep(1.0)
    except BaseException:
        # Each worker stops at a batch boundary and re-enqueues its trial; wait for that.
        with runs.deferred_signals(raise_after=False):
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(timeout=120)
                if p.is_alive():
                    p.kill()
        raise
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise CnnopsError(f"{len(failed)} of {workers} tune workers failed (exit codes {failed})")
