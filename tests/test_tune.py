"""The tune stage's pure parts: the search space, how it is applied, how a study is named."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from cnnops import studies, tune
from cnnops.config import load_config
from cnnops.errors import ConfigError
from tests.conftest import ROOT


def config(*overrides: str):  # noqa: ANN201
    return load_config(ROOT / "params.yaml", list(overrides))


def test_apply_sets_every_lever_and_monitors_the_study_metric() -> None:
    base = config("tune.metric=val_acc")
    params = {
        "dropout_conv": 0.2,
        "dropout_fc": 0.4,
        "weight_decay": 1e-3,
        "l1": 1e-5,
        "batch_norm": False,
        "noise_std": 0.1,
        "lr": 5e-4,
    }
    tuned = tune.apply(base, params)
    assert (tuned.model.dropout_conv, tuned.model.dropout_fc) == (0.2, 0.4)
    assert tuned.train.optimizer.weight_decay == 1e-3 and tuned.train.optimizer.lr == 5e-4
    assert (tuned.train.l1, tuned.model.batch_norm, tuned.model.noise_std) == (1e-5, False, 0.1)
    assert tuned.train.early_stopping.monitor == "val_acc"
    assert base.model.dropout_fc != 0.4  # the base config is left alone


def test_sampled_values_stay_in_their_ranges_and_log_levers_use_a_log_scale() -> None:
    base = config("tune.space.lr=[0.001, 0.002]", "tune.space.batch_norm=[true]")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = tune.sample(trial, base)
    assert 0.001 <= params["lr"] <= 0.002 and params["batch_norm"] is True
    assert trial.distributions["lr"].log and not trial.distributions["dropout_fc"].log


def test_augment_strength_is_tuned_only_when_there_are_transforms_to_scale() -> None:
    assert "augment_strength" not in tune.active_levers(config("augment.transforms=[]"))
    augmented = config("augment.transforms=[{name: affine, p: 0.5}]")
    assert "augment_strength" in tune.active_levers(augmented)
    tuned = tune.apply(augmented, {"augment_strength": 0.25})
    assert tuned.augment.strength == 0.25
    assert "lr" in tune.active_levers(augmented)


def test_a_lever_can_be_left_out_of_the_search() -> None:
    assert "l1" not in tune.active_levers(config("tune.space.l1=null"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space.dropout_fc=[0.5, 0.1]", "low 0.5 is above high 0.1"),
        ("tune.space.lr=[0.0, 0.01]", "log-scale range must start above 0"),
        ("tune.direction=maximize", "contradicts metric 'val_loss'"),
        ("tune.metric=test_acc", "tune.metric = 'test_acc'"),
        ("tune.pruner.name=asha", "tune.pruner.name = 'asha'"),
        ("tune.trials_at_once=0", "tune.trials_at_once = 0"),
        ("tune.trials_at_once=65", "tune.trials_at_once = 65"),
    ],
)
def test_bad_tune_settings_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(override)


def test_a_range_end_outside_its_lever_is_refused_at_load() -> None:
    bad = r"tune.space.dropout_fc = \[0.0, 1.0\]: 1.0 .*model.dropout_fc"
    with pytest.raises(ConfigError, match=bad):
        config("tune.space.dropout_fc=[0.0, 1.0]")


def test_study_name_follows_space_and_data_but_not_the_trial_budget(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"one")
    name = studies.study_name(config(), tmp_path)
    assert name == studies.study_name(config("tune.n_trials=50", "tune.workers=3"), tmp_path)
    assert name != studies.study_name(config("tune.space.lr=[0.001, 0.01]"), tmp_path)
    assert name != studies.study_name(config("train.max_epochs=3"), tmp_path)
    (tmp_path / "x.npy").write_bytes(b"two")
    assert name != studies.study_name(config(), tmp_path)
    assert studies.study_name(config("tune.study_name=mine"), tmp_path) == "mine"


def test_study_lock_excludes_other_holders(tmp_path: Path) -> None:
    import fcntl

    with (
        studies.study_lock("x.journal", "s", tmp_path),
        (tmp_path / "s.lock").open("a") as f,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with (tmp_path / "s.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_workers_are_spread_over_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    tune.pin_gpus(4)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    tune.pin_gpus(4)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # one GPU: every worker shares it


def test_ddp_workers_get_a_group_of_gpus_each(monkeypatch: pytest.MonkeyPatch) -> None:
    for worker, group in [(0, "4,5"), (1, "6,7"), (2, "4,5")]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")  # 8 is left over
        tune.pin_gpus(worker, per_worker=2)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == group


class FakeRank:
    """A follower process that never joins: it only records how it was ended."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.ended: list[str] = []

    def kill(self) -> None:
        self.ended.append("kill")

    def terminate(self) -> None:
        self.ended.append("terminate")

    def wait(self, timeout: float | None = None) -> int:
        self.ended.append("wait")
        return -9


def test_a_ddp_group_that_cannot_form_leaves_no_rank_env_or_job_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from cnnops import ddp_trials

    names = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "RANK", "LOCAL_RANK")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started: list[FakeRank] = []
    monkeypatch.setattr(
        ddp_trials.subprocess, "Popen", lambda *a, **k: started.append(FakeRank()) or started[-1]
    )

    def no_rendezvous(*_: object) -> None:
        raise RuntimeError("the other ranks never came")

    monkeypatch.setattr(ddp_trials, "_join_group", no_rendezvous)
    job = tune.Job(config("train.accelerator=cpu"), "study", str(tmp_path / "journal"))
    with pytest.raises(RuntimeError, match="never came"):
        ddp_trials.Ranks(job, 3)
    assert not set(names) & set(os.environ)  # a later Trainer here launches its own ranks
    assert list(tmp_path.iterdir()) == []  # the pickled config is gone
    assert len(started) == 2 and all(p.ended and p.ended[-1] == "wait" for p in started)


def test_a_new_study_starts_from_the_configured_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # paths.models (relative, inside the project) lands here
    base = config(
        "model.dropout_fc=0.25",
        "train.optimizer.lr=0.02",
        "tune.space.lr=[0.0003, 0.01]",
    )
    expected = tune.baseline(base)
    assert expected["dropout_fc"] == 0.25 and expected["batch_norm"] == base.model.batch_norm
    assert "lr" not in expected  # 0.02 lies outside its range: the sampler draws it instead
    job = tune.Job(base, "s", str(tmp_path / "studies.journal"))
    study = tune.open_study(job)
    first = tune._next_trial(study, job)
    assert isinstance(first, optuna.Trial)
    params = tune.sample(first, base)
    assert {k: params[k] for k in expected} == expected and 3e-4 <= params["lr"] <= 1e-2
    assert first.user_attrs == {studies.OWNER_KEY: studies.owner(), tune.BASELINE_KEY: True}
    study.tell(first, 0.5)
    second = tune._next_trial(study, job)  # only a study's very first trial is the baseline
    assert isinstance(second, optuna.Trial) and tune.BASELINE_KEY not in second.user_attrs
    off = tune.Job(config("tune.start_from_params=false"), "t", job.storage)
    assert tune.BASELINE_KEY not in tune._next_trial(tune.open_study(off), off).user_attrs


def test_successive_halving_prunes_trials_running_together_where_the_median_cannot() -> None:
    # Six trials train at once and report two epochs each; none has finished. The median
    # pruner waits for finished trials; successive halving keeps, at epoch 2, the trials in the
    # best third of those that got there before them: the last one asked is second of six.
    reports = ([0.90, 0.50, 0.50, 0.50, 0.50, 0.50], [0.95, 0.50, 0.60, 0.70, 0.80, 0.90])
    for name, pruned in (
        ("median", [False] * 6),
        ("successive_halving", [False, True, True, True, True, False]),
    ):
        config = load_config(
            ROOT / "params.yaml",
            [
                f"tune.pruner.name={name}",
                "tune.pruner.warmup_epochs=1",
                "tune.pruner.startup_trials=0",
            ],
        )
        study = optuna.create_study(direction="maximize", pruner=tune._pruner(config))
        trials = [study.ask() for _ in range(6)]
        for step, values in enumerate(reports):
            for trial, value in zip(trials, values, strict=True):
                trial.report(value, step)
        assert [t.should_prune() for t in trials] == pruned, name


@pytest.mark.parametrize("warmup", [1, 2])
def test_successive_halving_first_prunes_after_the_epoch_that_follows_its_warmup(
    warmup: int,
) -> None:
    # Epochs report as steps 0, 1, ...: the first rung is step `warmup`, the epoch after the
    # `warmup` epochs that are never pruned; the next ones are 3 and 9 times further.
    config = load_config(
        ROOT / "params.yaml",
        ["tune.pruner.name=successive_halving", f"tune.pruner.warmup_epochs={warmup}"],
    )
    study = optuna.create_study(direction="maximize", pruner=tune._pruner(config))
    leader, behind = study.ask(), study.ask()
    decisions = []
    for step in range(warmup + 2):
        leader.report(0.9, step)
        assert not leader.should_prune()
        behind.report(0.1, step)
        decisions.append(behind.should_prune())
    assert decisions.index(True) == warmup  # after epoch warmup + 1
