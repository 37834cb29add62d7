"""The model registry against real backends: SQLite and an `mlflow server` process on loopback."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnops import registry
from cnnops.checkpoints import sha256_file
from cnnops.config import Config, load_config
from cnnops.errors import DataError, RegistryError
from tests.conftest import cnnops, postgres_database
from tests.mlflow_server import free_port, mlflow_server

# Three candidates, cheap on two CPU cores, far apart on digits' test split (~0.86, ~0.08, ~0.98).
FIRST = ["train.max_epochs=1", "train.optimizer.lr=1e-3"]
WORSE = ["train.max_epochs=1", "train.optimizer.lr=1e-5"]
BETTER = ["train.max_epochs=3", "train.optimizer.lr=3e-3"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Team mode: an `mlflow server` whose backend store is the local PostgreSQL."""
    folder = tmp_path_factory.mktemp("mlflow-pg")
    with postgres_database("cnnops_mlflow") as db, mlflow_server(folder, backend=db) as url:
        yield url


@pytest.fixture(params=["sqlite", "server", "server-postgresql"])
def backend(request: pytest.FixtureRequest, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the registry lives: the workdir's SQLite file, or a real server on loopback."""
    if request.param == "server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("server_url"))
    if request.param == "server-postgresql":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("postgres_server_url"))
    return request.param


def make_config(workdir: Path, name: str, *overrides: str) -> Config:
    return load_config(
        workdir / "params.yaml",
        ["train.accelerator=cpu", f"registry.model_name={name}", *overrides],
    )


def prepared(config: Config) -> None:
    from cnnops.data.prepare import prepare
    from cnnops.data.sources import fetch

    paths = config.paths
    fetch(config.fetch, paths.raw)
    prepare(config, paths.raw, paths.prepared, paths.reports / "data.json")


def pipeline(config: Config) -> dict:
    """train → register → evaluate → promote, as `dvc repro` runs them."""
    from cnnops.evaluate import evaluate_stage
    from cnnops.train import train_stage

    train_stage(config)
    registry.register(config)
    evaluate_stage(config)
    return registry.promote(config)


def versions(config: Config) -> dict[str, str]:
    client = registry.connect(config.mlflow)
    model = client.get_registered_model(config.registry.model_name)
    return {alias: str(v) for alias, v in model.aliases.items()}


def tags(config: Config, version: str) -> dict[str, str]:
    client = registry.connect(config.mlflow)
    return client.get_model_version(config.registry.model_name, version).tags


@pytest.mark.slow
def test_gate_promotes_first_keeps_worse_promotes_better_and_rolls_back(
    workdir: Path, backend: str
) -> None:
    name = f"digits-{uuid.uuid4().hex[:8]}"
    first = make_config(workdir, name, *FIRST)
    prepared(first)

    result = pipeline(first)
    assert versions(first) == {"challenger": "1", "champion": "1"}
    assert result["promoted"] and result["onnx_parity_ok"] and result["onnx_max_abs_diff"] <= 1e-4
    v1 = tags(first, "1")
    run = json.loads((workdir / "models/train/run.json").read_text())
    assert v1["cnnops.run_id"] == run["mlflow_run_id"] and v1["cnnops.candidate"] == "train"
    assert v1["promotion.previous_champion"] == "none" and v1["onnx.parity"] == "pass"
    assert json.loads(v1["classes"]) == [str(i) for i in range(10)]
    assert {"git.commit", "params", "preprocessing", "val_acc"} <= set(v1)
    assert v1["checkpoint.sha256"] == sha256_file(workdir / "models/train/best.ckpt")
    onnx_sha256 = sha256_file(workdir / "models/champion.onnx")
    assert result["onnx_sha256"] == v1["onnx.sha256"] == onnx_sha256

    result = pipeline(make_config(workdir, name, *WORSE))
    assert versions(first) == {"challenger": "2", "champion": "1"}
    v2 = tags(first, "2")
    assert not result["promoted"] and v2["promotion.decision"] == "kept champion"
    assert float(v2["promotion.challenger_score"]) < float(v2["promotion.champion_score"])
    assert v2["promotion.previous_champion"] == "1" and "promotion.time" in v2

    result = pipeline(make_config(workdir, name, *BETTER))
    assert result["promoted"] and versions(first) == {"challenger": "3", "champion": "3"}
    assert tags(first, "3")["promotion.previous_champion"] == "1"
    assert tags(first, "1")["champion.replaced_by"] == "3"
    assert tags(first, "3")["onnx.parity"] == "pass"

    assert registry.rollback(first)["champion_version"] == 1
    assert versions(first)["champion"] == "1" and tags(first, "3")["rollback.to"] == "1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(first)

    from cnnops.evaluate import evaluate_stage

    evaluate_stage(first)  # the rolled-back version is still @challenger, and stays out
    result = registry.promote(first)
    assert not result["promoted"] and "rolled back" in result["reason"]
    assert versions(first)["champion"] == "1"


@pytest.mark.slow
def test_registered_model_takes_raw_uint8_images_and_returns_probabilities(workdir: Path) -> None:
    import mlflow

    config = make_config(workdir, "digits", *FIRST)
    prepared(config)
    pipeline(config)
    info = mlflow.models.get_model_info("models:/digits@champion")
    assert info.metadata["input"] == "raw uint8 images of shape (N, 1, 8, 8)"
    model = mlflow.pyfunc.load_model("models:/digits@champion")
    x = np.load(workdir / "data/prepared/test_x.npy")[:50]
    proba = model.predict(x)
    assert proba.shape == (50, 10) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match=r"; got float32 \(50, 1, 8, 8\): pixel values are"):
        model.predict(x.astype(np.float32))


@pytest.mark.slow
def test_register_picks_the_tune_candidate_when_its_validation_accuracy_is_higher(
    workdir: Path,
) -> None:
    from cnnops.train import train_stage

    config = make_config(workdir, "digits", *FIRST)
    prepared(config)
    train_stage(config)
    shutil.copytree(workdir / "models/train", workdir / "models/tune")
    run = json.loads((workdir / "models/tune/run.json").read_text())
    run.update(best_val_acc=run["best_val_acc"] + 0.01, params={"model.dropout_fc": 0.1})
    (workdir / "models/tune/run.json").write_text(json.dumps(run))
    pointer = registry.register(config)
    assert pointer["candidate"] == "tune" and pointer["version"] == 1
    assert json.loads(tags(config, "1")["cnnops.tuned_params"]) == {"model.dropout_fc": 0.1}
    assert json.loads((workdir / "models/registry.json").read_text()) == pointer


def candidate(folder: Path, name: str, **run: float) -> registry.Candidate:
    (folder / name).mkdir(parents=True)
    (folder / name / "best.ckpt").write_bytes(b"")
    (folder / name / "run.json").write_text(json.dumps(run))
    return registry.Candidate(name, folder / name / "best.ckpt", run)


def test_find_candidates_skips_absent_folders_and_pick_needs_one(tmp_path: Path) -> None:
    candidate(tmp_path, "train", best_val_acc=0.9, best_val_loss=0.3)
    candidate(tmp_path, "tune", best_val_acc=0.9, best_val_loss=0.2)
    found = registry.find_candidates(tmp_path, ["train", "tune", "absent"])
    assert [c.name for c in found] == ["train", "tune"]
    with pytest.raises(DataError, match="run `cnnops train` first"):
        registry.pick([], "val_acc")


@pytest.mark.parametrize(
    ("select_by", "train", "tune", "winner"),
    [
        ("val_acc", (1.0, 0.3), (1.0, 0.2), "tune"),  # tied accuracy: the lower loss wins
        ("val_acc", (1.0, 0.2), (1.0, 0.3), "train"),
        ("val_acc", (0.95, 0.9), (0.9, 0.1), "train"),  # the primary metric decides first
        ("val_loss", (0.8, 0.25), (0.9, 0.25 + 1e-12), "tune"),  # tied loss: higher accuracy
        ("val_loss", (0.9, 0.3), (0.8, 0.2), "tune"),
        ("val_acc", (1.0, None), (1.0, 5.0), "tune"),  # no tie-breaker loses the tie
        ("val_acc", (1.0, 0.1), (1.0, 0.1), "train"),  # a full tie: the earlier candidate
    ],
)
def test_pick_ranks_by_validation_metric_and_the_other_one_breaks_a_tie(
    tmp_path: Path,
    select_by: str,
    train: tuple[float, float | None],
    tune: tuple[float, float | None],
    winner: str,
) -> None:
    def make(name: str, acc: float, loss: float | None) -> registry.Candidate:
        run = {"best_val_acc": acc} | ({} if loss is None else {"best_val_loss": loss})
        return registry.Candidate(name, tmp_path / name / "best.ckpt", run)

    assert registry.pick([make("train", *train), make("tune", *tune)], select_by).name == winner


@pytest.mark.parametrize(
    ("challenger", "champion", "min_delta", "promoted"),
    [
        (0.5, None, 0.1, True),
        (0.95, 0.90, 0.05, True),
        (0.94, 0.90, 0.05, False),
        (0.90, 0.90, 0.0, False),
        (0.80, 0.90, 0.0, False),
        (0.91, 0.90, 0.0, True),
    ],
)
def test_decide_promotes_only_a_strict_gain_of_at_least_min_delta(
    challenger: float, champion: float | None, min_delta: float, promoted: bool
) -> None:
    assert registry.decide(challenger, champion, min_delta)[0] is promoted


def test_unreachable_registry_is_one_clear_line_and_exit_2(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    result = cnnops("promote", cwd=workdir)
    assert result.returncode == 2
    assert f"model registry at {url} is unreachable" in result.stderr


def test_missing_model_or_alias_is_named(workdir: Path) -> None:
    prepared(make_config(workdir, "nobody"))
    result = cnnops("evaluate", "--set", "registry.model_name=nobody", cwd=workdir)
    assert result.returncode == 2 and "no registered model named 'nobody'" in result.stderr
    config = make_config(workdir, "empty")
    registry.connect(config.mlflow).create_registered_model("empty")
    result = cnnops("rollback", "--set", "registry.model_name=empty", cwd=workdir)
    assert result.returncode == 2 and "'empty' has no @champion alias" in result.stderr


def use_store(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")


@pytest.mark.slow
def test_register_in_a_store_without_the_training_run_logs_the_checkpoint_with_its_provenance(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone: its checkpoints came through DVC, its MLflow store is its own and empty."""
    import subprocess

    import yaml

    from cnnops.checkpoints import sha256_file
    from cnnops.train import train_stage

    config = make_config(workdir, "digits", *FIRST)
    prepared(config)
    train_stage(config)  # into the workdir's own store
    trained = json.loads((workdir / "models/train/run.json").read_text())
    origin = trained["mlflow_run_id"]
    sha256 = sha256_file(workdir / "models/train/best.ckpt")
    lock = {"stages": {"train": {"outs": [{"path": "models/train", "md5": "abc123.dir"}]}}}
    (workdir / "dvc.lock").write_text(yaml.safe_dump(lock))
    for command in (["init", "-q"], ["add", "dvc.lock", "params.yaml"]):
        subprocess.run(["git", *command], cwd=workdir, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"],
        cwd=workdir,
        check=True,
    )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout.strip()

    use_store(monkeypatch, workdir / "clone.db")
    pointer = registry.register(config)
    client = registry.connect(config.mlflow)
    run = client.get_run(pointer["run_id"])
    assert pointer["run_id"] != origin and pointer["origin_run_id"] == origin
    assert run.info.run_name == "register-train" and run.info.status == "FINISHED"
    assert run.data.tags["cnnops.origin_run_id"] == origin
    assert run.data.tags["checkpoint.sha256"] == sha256
    assert run.data.tags["dvc.models/train"] == "abc123.dir"
    assert run.data.tags["git.commit"].removesuffix("-dirty") == head
    assert run.data.params["train.max_epochs"] == "1"
    assert run.data.metrics["best_val_acc"] == trained["best_val_acc"]
    version = client.get_model_version("digits", "1")
    assert version.run_id == pointer["run_id"]
    assert version.tags["cnnops.run_id"] == pointer["run_id"]
    assert version.tags["cnnops.origin_run_id"] == origin
    assert version.tags["checkpoint.sha256"] == sha256
    model, _ = registry.load_model(client, "digits", "challenger")  # verified, loaded
    x = np.load(workdir / "data/prepared/test_x.npy")[:8]
    assert model.predict(x).shape == (8, 10)

    # In the store that holds the training run, the version goes into that run, as before.
    use_store(monkeypatch, workdir / "mlflow.db")
    pointer = registry.register(config)
    assert pointer["run_id"] == pointer["origin_run_id"] == origin
    client = registry.connect(config.mlflow)
    assert tags(config, "1")["cnnops.run_id"] == origin
    runs = client.search_runs([client.get_run(origin).info.experiment_id])
    assert not [r for r in runs if r.info.run_name.startswith("register-")]
