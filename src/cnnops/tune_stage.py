"""`cnnops tune`: run the study's workers, then write the stage's outputs for DVC and register.

Outputs: reports/tune/{best_params.yaml, trials.csv, tune.json, study plots} and
models/tune/{best.ckpt, run.json}, the same contract as models/train for the register stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops import progress, runs, studies, tune
from cnnops.config import LEVERS, Config, dump_yaml
from cnnops.errors import CnnopsError, DataError
from cnnops.timings import phase

if TYPE_CHECKING:
    import optuna

    from cnnops.tracker_process import TrackerProcess


class Progress:
    """A bar over finished trials with the best value so far, on a terminal's stderr only
    (`cnnops.progress`); without one, each worker logs a line per trial instead."""

    def __init__(self, total: int, metric: str) -> None:
        self.metric = metric
        self.bar = progress.bar(total, "trials", unit="trial")

    def update(self, study: optuna.Study) -> None:
        c = tune.counts(study)
        self.bar.n = c["complete"] + c["pruned"]
        trials = study.get_trials(deepcopy=False)
        scores = [t.value for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        if scores:
            best = max(scores) if study.direction.name == "MAXIMIZE" else min(scores)
            self.bar.set_postfix({f"best {self.metric}": f"{best:.4g}", "pruned": c["pruned"]})
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def tune_stage(
    config: Config, workers: int | None = None, mlflow: TrackerProcess | None = None
) -> dict[str, Any]:
    """Run (or resume) the study until it has `tune.n_trials` finished trials; write outputs.
    The study's MLflow run is made in `mlflow` where given (a process warming MLflow up while
    this one imports torch), else in this process.

    SIGTERM/SIGINT stop every worker at a batch boundary; each running trial is failed and
    queued again, and the rerun resumes it from its last checkpoint."""

    with phase("import"):  # torch and Lightning: most of what the stage waits for
        from cnnops import fused
        from cnnops.ddp_trials import world_size

    tune.quiet()
    runs.die_with_parent()
    world_size(config)  # DDP trials need a number of devices: refused before anything starts
    fused.check(config)
    with runs.exclusive(config.paths.models / "tune", "cnnops tune"):
        timeout = config.tune.timeout
        job = tune.Job(
            config,
            studies.study_name(config, config.paths.prepared),
            studies.storage_url(config),
            deadline=time.time() + timeout if timeout else None,
        )
        with phase("study: open"):
            study = tune.open_study(job)
            parent = parent_run(job, study, mlflow)
        job = replace(job, parent_run_id=parent.run_id)
        progress = Progress(config.tune.n_trials, config.tune.metric)
        with parent:
            try:
                workers = workers or config.tune.workers
                if workers == 1:
                    tune.run_worker(job, on_trial=progress.update)
                else:
                    tune.run_workers(job, workers, on_poll=lambda: progress.update(study))
                progress.update(study)
            except runs.Interrupted as e:
                c = tune.counts(study)
                e.detail = (
                    f"{c['complete'] + c['pruned']} of {config.tune.n_trials} trials finished; "
                    "rerun `cnnops tune` (or `dvc repro`) to resume the study"
                )
                raise
            finally:
                progress.close()
            with runs.deferred_signals(), phase("study: outputs"):
                summary = write_outputs(config, study)
                parent.log_metrics(summary, step=len(study.trials))
                parent.set_tags({"best_trial.run_id": summary["mlflow_run_id"]})
                folder = config.paths.reports / "tune"
                for path in sorted(folder.iterdir()):
                    parent.log_artifact(path, "tune")
    return summary


def parent_run(job: tune.Job, study: optuna.Study, mlflow: TrackerProcess | None = None) -> Any:
    """The study's MLflow run: created once, reopened when the study resumes; in `mlflow`'s
    process where given."""
    from cnnops import tracking
    from cnnops.config import flatten

    cfg = job.config.mlflow

    def run(name: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> Any:
        if mlflow is not None:
            return mlflow.open(name, tags=tags, run_id=run_id)
        return tracking.MlflowTracker(cfg, name, tags=tags, run_id=run_id)

    with studies.study_lock(job.storage, job.study, job.config.paths.models / "optuna"):
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id:
            return run(job.study, run_id=run_id)
        tags = {
            "cnnops.stage": "tune",
            "optuna.study": job.study,
            "git.commit": tracking.git_commit(),
            **tracking.environment(),
        }
        parent = run(f"tune {job.study}", tags=tags)
        parent.log_params(flatten(job.config))
        study.set_user_attr("mlflow_parent_run_id", parent.run_id)
        return parent


def write_outputs(config: Config, study: optuna.Study) -> dict[str, Any]:
    """best_params.yaml, trials.csv, tune.json, plots, and the best trial's checkpoint."""
    from cnnops import reports

    try:
        best = study.best_trial
    except ValueError:
        raise CnnopsError(
            f"study {study.study_name}: no trial completed; see trials above"
        ) from None
    folder, models = config.paths.reports / "tune", config.paths.models / "tune"
    models.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(best.user_attrs["checkpoint"])
    if not checkpoint.is_file():  # team mode: the best trial may have run on another machine
        raise DataError(
            f"{checkpoint}: best trial {best.number}'s checkpoint is not on this "
            "machine; run `cnnops tune` where it ran, or share paths.models"
        )
    copy = models / ".best.ckpt.tmp"
    shutil.copy2(checkpoint, copy)
    os.replace(copy, models / "best.ckpt")  # never half a checkpoint under the final name
    metrics = best.user_attrs.get("metrics", {})
    run_id = best.user_attrs.get("mlflow_run_id")
    reports.write_json(
        models / "run.json",
        {
            "mlflow_run_id": run_id,
            **metrics,
            "params": best.params,
            "study": study.study_name,
            "trial": best.number,
        },
    )
    write_best_params(folder / "best_params.yaml", config, study)
    reports.write_csv(folder / "trials.csv", [_row(t) for t in study.trials])
    with phase("study: outputs: plots"):
        reports.plot_study(study, folder)
    c = tune.counts(study)
    summary = {
        "study": study.study_name,
        "metric": config.tune.metric,
        "best_value": best.value,
        "best_trial": best.number,
        "complete": c["complete"],
        "pruned": c["pruned"],
        "failed": c["fail"],
        "best_val_acc": metrics.get("best_val_acc"),
        "best_val_loss": metrics.get("best_val_loss"),
        "mlflow_run_id": run_id,
        **_baseline(config),
    }
    reports.write_json(folder / "tune.json", summary)
    return summary


def write_best_params(path: Path, config: Config, study: optuna.Study) -> None:
    best = study.best_trial
    overrides = {LEVERS[k]: v for k, v in best.params.items()}
    data = {
        "study": study.study_name,
        "metric": config.tune.metric,
        "value": best.value,
        "trial": best.number,
        "params": best.params,
        "overrides": overrides,
    }  # `cnnops train --set KEY=VALUE` for each, to retrain
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(data))


def _row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    metrics = trial.user_attrs.get("metrics", {})
    duration = trial.duration.total_seconds() if trial.duration else None
    epochs = metrics.get("epochs_run") or (max(trial.intermediate_values, default=-1) + 1)
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        **{f"params_{k}": v for k, v in trial.params.items()},
        "epochs": epochs,
        "best_val_acc": metrics.get("best_val_acc"),
        "best_val_loss": metrics.get("best_val_loss"),
        "duration_s": duration,
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
    }


def _baseline(config: Config) -> dict[str, Any]:
    """The train stage's validation scores, when it ran, to compare the tuned ones against."""
    path = config.paths.reports / "train.json"
    if not path.is_file():
        return {}
    train = json.loads(path.read_text())
    return {
        "baseline_val_acc": train.get("best_val_acc"),
        "baseline_val_loss": train.get("best_val_loss"),
    }
