"""The registered model as its consumers meet it: `mlflow.pyfunc.load_model(uri).predict(x)` and
`cnnops serve` answer a wrong input in one line of ours, and loading skips Lightning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from tests.conftest import BIN, ROOT
from tests.mlflow_server import free_port, running
from tests.test_registry import FIRST, make_config, prepared
from tests.test_serve import post

URI = "models:/digits@challenger"
EXPECTED = "expected raw uint8 images of shape (N, 1, 8, 8)"
# Wrong inputs a JSON request can carry too, each with the one line both ways answer it with.
WRONG: dict[str, tuple[Callable[[np.ndarray], Any], str]] = {
    "normalized floats": (
        lambda x: x / 255.0,
        "got float64 (40, 1, 8, 8): pixel values are integers 0..255, not normalized floats",
    ),
    "no channel axis": (lambda x: x[:, 0], "got uint8 (40, 8, 8)"),
    "three channels": (lambda x: np.repeat(x, 3, axis=1), "got uint8 (40, 3, 8, 8)"),
    "a larger size": (lambda x: np.tile(x, (1, 1, 2, 2)), "got uint8 (40, 1, 16, 16)"),
    "an empty batch": (lambda x: x[:0], "got an empty batch: send at least one image"),
    "values over 255": (
        lambda x: x.astype(np.int64) + 256,
        "got int64 (40, 1, 8, 8) with values outside 0..255",
    ),
    "a ragged list": (lambda x: [x[0].tolist(), x[1, :, :4].tolist()], "got a ragged list"),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Digits trained for an epoch and registered as version 1 (@challenger) of `digits` in the
    folder's own SQLite store; the module's tests run in that folder, on that store."""
    from cnnops import registry
    from cnnops.data import prepare
    from cnnops.train import train

    folder = tmp_path_factory.mktemp("pyfunc")
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        config = make_config(folder, "digits", *FIRST)
        prepared(config)
        result = train(config, prepare.load(config.paths.prepared), folder / "models/train")
        (folder / "models/train/run.json").write_text(json.dumps(result.metrics))
        registry.register(config)
        yield folder


@pytest.fixture(scope="module")
def model(project: Path) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(URI)


@pytest.fixture(scope="module")
def x(project: Path) -> np.ndarray:
    return np.load(project / "data/prepared/test_x.npy")[:40]


def refusal(model: Any, images: Any) -> str:
    with pytest.raises(MlflowException) as caught:
        model.predict(images)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400 where MLflow serves it
    return str(caught.value)


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrong_input_is_refused_in_one_line_naming_what_was_expected_and_given(
    model: Any, x: np.ndarray, case: str
) -> None:
    make, got = WRONG[case]
    message = refusal(model, make(x))
    assert message == f"{EXPECTED}; {got}"
    assert "\n" not in message and "[[" not in message and "enforce" not in message


def test_a_float32_batch_is_named_by_its_own_dtype(model: Any, x: np.ndarray) -> None:
    message = refusal(model, x.astype(np.float32))
    assert message == (
        f"{EXPECTED}; got float32 (40, 1, 8, 8): pixel values are integers 0..255, "
        "not normalized floats"
    )


def test_integer_pixels_and_lists_of_them_are_the_same_images(model: Any, x: np.ndarray) -> None:
    proba = model.predict(x)
    assert proba.shape == (40, 10) and proba.dtype == np.float32
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(model.predict(x.astype(np.int64)), proba)
    assert np.array_equal(model.predict(x.tolist()), proba)


def test_the_model_page_documents_the_input_the_signature_leaves_unenforced(model: Any) -> None:
    import mlflow

    info = mlflow.models.get_model_info(URI)
    assert info.signature.inputs is None
    output = info.signature.outputs.inputs[0]
    assert output.type == np.dtype(np.float32) and output.shape == (-1, 10)
    assert info.metadata["input"] == EXPECTED.removeprefix("expected ")
    example = model.input_example
    assert example.shape == (2, 1, 8, 8) and model.predict(example).shape == (2, 10)


def test_the_registered_network_predicts_what_the_lightning_classifier_does(
    project: Path,
) -> None:
    from cnnops.checkpoints import load_classifier
    from cnnops.registry.network import load_network

    checkpoint = project / "models/train/best.ckpt"
    images = np.load(project / "data/prepared/test_x.npy")
    expected = load_classifier(checkpoint).predict_images(images, batch_size=128)
    assert np.array_equal(load_network(checkpoint).predict_images(images, batch_size=128), expected)


def test_loading_and_predicting_imports_neither_lightning_nor_torchvision(project: Path) -> None:
    code = (
        "import json, sys, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "model.predict(model.input_example)\n"
        "print(json.dumps([m for m in ('lightning', 'torchmetrics', 'torchvision') "
        "if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, URI], capture_output=True, text=True, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.fixture(scope="module")
def served(project: Path) -> Iterator[str]:
    """`cnnops serve --alias challenger` on a free loopback port, in the project on its store."""
    port = free_port()
    command = [str(BIN / "cnnops"), "serve", "--alias", "challenger", "--port", str(port)]
    command += ["--set", "registry.model_name=digits"]
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/ping", project / "serve.log", cwd=project):
        yield f"{url}/invocations"


@pytest.mark.slow
def test_the_server_answers_a_wrong_input_with_the_model_s_own_message(
    served: str, model: Any, x: np.ndarray
) -> None:
    for case, (make, got) in WRONG.items():
        images = make(x)
        payload = images.tolist() if isinstance(images, np.ndarray) else images
        status, body = post(served, {"inputs": payload})
        assert status == 400, (case, body)
        assert body["message"] == refusal(model, images) == f"{EXPECTED}; {got}", case
    status, body = post(served, {"inputs": x.tolist()})
    assert status == 200
    assert np.allclose(np.array(body["predictions"]), model.predict(x), atol=1e-6)


def test_the_model_is_verified_in_the_clients_store_whatever_mlflow_points_at(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from cnnops.registry.store import verified_model

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("digits", "1")
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"  # a store without the model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    assert (verified_model(client, "digits", version) / "MLmodel").is_file()
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == elsewhere  # put back
