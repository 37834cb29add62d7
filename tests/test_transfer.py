"""Transfer learning with the real ImageNet MobileNetV2 (torchvision's file): it loads and
helps, its fine-tuning schedule resumes mid-way, and the transfer variant goes the whole way
(train → tune → register → evaluate → ONNX → serve) under `dvc repro` in a git repository."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cnnops import tracking
from cnnops.data.demo import colour_digits
from tests.conftest import BIN, ROOT, cnnops, set_args, set_params
from tests.mlflow_server import free_port, running
from tests.test_resume import curves, epochs_in, wait_until
from tests.test_serve import post

pytestmark = pytest.mark.slow

# A small budget on a 2-core CPU: 64 px images seen at 64 px, a few epochs.
QUICK = [
    "train.accelerator=cpu",
    "train.deterministic=true",
    "train.batch_size=32",
    "train.early_stopping.enabled=false",
    "model.input_size=64",
]
SCRATCH = [
    "model.weights=null",
    "model.weights_sha256=null",
    "model.freeze=none",
    "model.unfreeze_epoch=null",
    "train.optimizer.backbone_lr_mult=1",
]


@pytest.fixture(scope="module")
def photos_project(tmp_path_factory: pytest.TempPathFactory, mobilenet_weights: Path) -> Path:
    """The transfer variant's params on 800 photo-like 64 px images, fetched and prepared."""
    folder = tmp_path_factory.mktemp("transfer")
    shutil.copy(ROOT / "pipelines/transfer/params.yaml", folder / "params.yaml")
    set_params(
        folder / "params.yaml",
        ["paths.src=src", "prepare.image_size=64", "prepare.val_fraction=0.2", *QUICK],
    )
    colour_digits(folder / "photos", 800, side=64)
    (folder / "weights").mkdir()
    shutil.copy(mobilenet_weights, folder / "weights" / mobilenet_weights.name)
    cnnops("fetch", cwd=folder, check=True)
    cnnops("prepare", cwd=folder, check=True)
    return folder


@pytest.fixture
def project(photos_project: Path, workdir: Path) -> Path:
    for name in ("params.yaml", "weights", "data"):
        source = photos_project / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, workdir / name)
    return workdir


def best_val_acc(folder: Path) -> float:
    return float(json.loads((folder / "reports/train.json").read_text())["best_val_acc"])


def test_pretrained_mobilenet_beats_the_same_network_from_scratch(project: Path) -> None:
    budget = ["train.max_epochs=5"]
    cnnops("train", *set_args(*budget), cwd=project, check=True)
    pretrained = best_val_acc(project)
    cnnops("train", *set_args(*budget, *SCRATCH), cwd=project, check=True)
    scratch = best_val_acc(project)
    # Seen on this data: about 0.45 against 0.12 (chance is 0.1).
    assert pretrained >= scratch + 0.15, (pretrained, scratch)


def test_a_fine_tuning_schedule_resumes_mid_way_to_the_uninterrupted_result(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Frozen for epochs 0-1, free from epoch 2; stopped after epoch 1 and resumed.
    schedule = set_args("train.max_epochs=3", "model.unfreeze_epoch=2")
    reference = tmp_path_factory.mktemp("reference")
    for name in ("params.yaml", "weights", "data"):
        source = project / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, reference / name)
    cnnops("train", *schedule, cwd=reference, check=True)

    proc = subprocess.Popen(
        [str(BIN / "cnnops"), "train", *schedule],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: epochs_in(project / "models/train.partial/last.ckpt") >= 1, "epoch 1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert epochs_in(project / "models/train.partial/last.ckpt") < 3
    # The rerun needs no weights file: everything comes from the checkpoint.
    (project / "weights/mobilenet_v2-b0353104.pth").rename(project / "weights/moved.pth")
    cnnops("train", *schedule, cwd=project, check=True)
    assert curves(project) == curves(reference)


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_the_transfer_variant_goes_the_whole_way(
    workdir: Path, mobilenet_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As its params.yaml says: demo images, the weights, `dvc repro` in a git repository,
    with the variant's own embedded MLflow store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    shutil.copytree(
        ROOT / "src/cnnops", workdir / "src/cnnops", ignore=shutil.ignore_patterns("__pycache__")
    )
    variant = workdir / "pipelines/transfer"
    shutil.copytree(ROOT / "pipelines/transfer", variant)
    quick = ["prepare.image_size=64", "train.max_epochs=2", "tune.n_trials=2", *QUICK]
    set_params(variant / "params.yaml", quick)
    run("git", "init", "-q", cwd=workdir)
    (workdir / ".gitignore").write_text("mlflow.db\nmlartifacts/\ndata/\nmodels/\n")
    cnnops("demo-images", "photos", "--n", "300", "--side", "64", cwd=variant, check=True)
    cnnops(
        "weights",
        "mobilenet_v2",
        "--mirror",
        str(mobilenet_weights.parent),
        cwd=variant,
        check=True,
    )
    run("git", "add", "-A", cwd=workdir)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=workdir)

    run("dvc", "repro", cwd=variant)
    train = json.loads((variant / "reports/train.json").read_text())
    assert train["epochs_run"] == 2
    tune = json.loads((variant / "reports/tune/tune.json").read_text())
    assert tune["complete"] + tune["pruned"] == 2 and tune["failed"] == 0
    evaluation = json.loads((variant / "reports/eval.json").read_text())
    assert evaluation["test_acc"] > 0.2  # chance is 0.1 after two short epochs
    promotion = json.loads((variant / "reports/promotion.json").read_text())
    assert promotion["promoted"] is True
    assert (variant / "models/champion.onnx").stat().st_size > 1_000_000  # MobileNetV2's weights

    x = np.load(variant / "data/prepared/test_x.npy")[:16]
    assert x.dtype == np.uint8 and x.shape[1:] == (3, 64, 64)
    with tracking.scoped(f"sqlite:///{variant / 'mlflow.db'}"):  # as a consumer points MLflow
        local = mlflow.pyfunc.load_model("models:/cnnops-transfer@champion").predict(x)
    assert local.shape == (16, 10) and np.allclose(local.sum(axis=1), 1.0, atol=1e-5)

    port = free_port()
    command = [str(BIN / "cnnops"), "serve", "--alias", "champion", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/ping", workdir / "serve.log", cwd=variant):
        status, body = post(f"{url}/invocations", {"inputs": x.tolist()})
    assert status == 200
    assert np.allclose(np.array(body["predictions"]), local, atol=1e-5)
