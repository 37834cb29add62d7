"""Models you can trust: unreadable checkpoints are one clear line, and registered artifacts are
checked against the SHA-256 recorded when they were registered."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from cnnops import registry
from cnnops.checkpoints import load_checkpoint, load_classifier, sha256_file
from cnnops.config import Config
from cnnops.errors import DataError, RegistryError
from tests.conftest import ROOT, cnnops
from tests.mlflow_server import free_port
from tests.test_registry import FIRST, make_config, prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding digits' prepared data and a real one-epoch models/train (its
    best.ckpt saved by the train stage's own code), with a run.json whose run is in no store."""
    from cnnops.data import prepare
    from cnnops.train import train

    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
        config = make_config(folder, "digits", *FIRST)
        prepared(config)
        result = train(config, prepare.load(config.paths.prepared), folder / "models/train")
    run = {"mlflow_run_id": "0" * 32, **result.metrics}
    (folder / "models/train/run.json").write_text(json.dumps(run))
    return folder


@pytest.fixture
def checkpoint(trained: Path) -> Path:
    return trained / "models/train/best.ckpt"


@pytest.fixture
def project(trained: Path, workdir: Path) -> Config:
    """The trained project copied into a fresh workdir (its own empty MLflow store)."""
    for folder in ("data/prepared", "models/train"):
        shutil.copytree(trained / folder, workdir / folder)
    return make_config(workdir, "digits")


def _refused_global(path: Path) -> None:
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)


def _truncated(source: Path) -> object:
    def write(path: Path) -> None:
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (None, "checkpoint missing"),
        (lambda p: p.write_bytes(b""), "empty file"),
        ("truncated", "truncated or not a PyTorch checkpoint"),
        (lambda p: p.write_text("not a checkpoint\n"), "truncated or not a PyTorch checkpoint"),
        (_refused_global, "holds an object of type argparse.Namespace"),
        (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, expected a dict"),
    ],
    ids=["missing", "empty", "truncated", "text", "refused-global", "not-a-dict"],
)
def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_why(
    tmp_path: Path, checkpoint: Path, make: object, why: str
) -> None:
    path = tmp_path / "best.ckpt"
    if make == "truncated":
        make = _truncated(checkpoint)
    if callable(make):
        make(path)
    for load in (load_checkpoint, load_classifier):
        with pytest.raises(DataError) as error:
            load(path)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and why in message and "\n" not in message
        assert "weights_only" not in message and "weights_only=False" not in message


def test_a_real_checkpoint_loads_weights_only_into_the_trained_classifier(
    checkpoint: Path,
) -> None:
    import lightning as L

    raw = load_checkpoint(checkpoint)
    assert {"state_dict", "hyper_parameters"} <= set(raw)
    model = load_classifier(checkpoint)
    assert isinstance(model, L.LightningModule) and not model.training
    for key, value in raw["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    proba = model.predict_proba(x)
    assert proba.shape == (4, 10) and torch.allclose(proba.sum(1), torch.ones(4))


def test_sha256_file_streams_the_whole_file(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.usefixtures("project")
def test_register_refuses_a_corrupt_candidate_with_exit_2_naming_the_file(workdir: Path) -> None:
    path = workdir / "models/train/best.ckpt"
    path.write_bytes(path.read_bytes()[:1000])
    result = cnnops("register", "--set", "registry.model_name=digits", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "weights_only" not in message
    assert "models/train/best.ckpt: checkpoint unreadable: truncated" in message
    # Refused before anything was written: no store, no registry pointer.
    assert not (workdir / "mlflow.db").exists() and not (workdir / "models/registry.json").exists()


def _refused(error: pytest.ExceptionInfo[RegistryError], expected: str, found: str) -> None:
    message = str(error.value)
    assert message.startswith("digits version 1: checkpoint ") and "\n" not in message
    assert f"has sha256 {found}, expected {expected}" in message
    assert "weights_only" not in message


def test_a_swapped_or_corrupted_registered_checkpoint_is_refused_before_any_use(
    project: Config, workdir: Path
) -> None:
    from cnnops.evaluate import evaluate_stage

    expected = sha256_file(workdir / "models/train/best.ckpt")
    assert registry.register(project)["checkpoint_sha256"] == expected
    client = registry.connect(project.mlflow)
    assert client.get_model_version("digits", "1").tags["checkpoint.sha256"] == expected
    registry.load_model(client, "digits", "challenger")  # untouched: verified and loaded

    # Swapped: another valid checkpoint, one weight changed, that would load without complaint.
    from mlflow.utils.file_utils import local_file_uri_to_path

    folder = local_file_uri_to_path(client.get_model_version_download_uri("digits", "1"))
    stored = Path(folder) / "artifacts/best.ckpt"
    original = stored.read_bytes()
    other = load_checkpoint(stored)
    next(iter(other["state_dict"].values())).add_(0.5)
    torch.save(other, stored)
    load_classifier(stored)
    swapped = sha256_file(stored)
    for command in (["evaluate"], ["serve", "--alias", "challenger", "--port", str(free_port())]):
        result = cnnops(*command, "--set", "registry.model_name=digits", cwd=workdir)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        message = result.stderr.strip()
        prefix = f"cnnops {command[0]}: error: digits version 1: checkpoint "
        assert "\n" not in message and message.startswith(prefix)
        assert f"{stored.as_posix()} has sha256 {swapped}, expected {expected}" in message
    with pytest.raises(RegistryError) as error:
        registry.promote(project)
    _refused(error, expected, swapped)
    assert registry.version_by_alias(client, "digits", "champion") is None

    stored.write_bytes(original[:-100])  # corrupted: truncated
    client.set_registered_model_alias("digits", "champion", "1")
    with pytest.raises(RegistryError) as error:
        registry.export_champion(project, client)
    _refused(error, expected, sha256_file(stored))

    stored.write_bytes(original)  # restored: trusted again
    assert evaluate_stage(project)["challenger"]["model_version"] == 1
    # What the trusted model learned is drawn, and logged with the evaluate run.
    drawn = ["feature_maps_per_block.png", "first_layer_kernels.png", "gradcam_misclassified.png"]
    assert sorted(p.name for p in (workdir / "reports/insight").iterdir()) == drawn
    (run,) = client.search_runs(
        [client.get_experiment_by_name(project.mlflow.experiment).experiment_id],
        "tags.`cnnops.stage` = 'evaluate'",
    )
    logged = client.list_artifacts(run.info.run_id, "evaluate/insight")
    assert sorted(Path(a.path).name for a in logged) == drawn

    client.delete_model_version_tag("digits", "1", "checkpoint.sha256")
    with pytest.raises(RegistryError, match=r"digits version 1 has no checkpoint.sha256 tag"):
        registry.load_model(client, "digits", "challenger")
