"""`cnnops serve`: MLflow's model server answering raw images for models:/<name>@champion."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN
from tests.mlflow_server import free_port, running
from tests.test_registry import FIRST, make_config, pipeline, prepared


def post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def served(workdir: Path) -> Iterator[str]:
    """Version 1 registered and promoted, then served by `cnnops serve` on a free loopback port."""
    config = make_config(workdir, "digits", *FIRST)
    prepared(config)
    pipeline(config)
    port = free_port()
    command = [
        str(BIN / "cnnops"),
        "serve",
        "--alias",
        "champion",
        "--port",
        str(port),
        "--set",
        "registry.model_name=digits",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/ping", workdir / "serve.log", cwd=workdir):
        yield f"{url}/invocations"


@pytest.mark.slow
def test_served_champion_labels_raw_images_and_refuses_bad_input(
    served: str, workdir: Path
) -> None:
    import mlflow

    x = np.load(workdir / "data/prepared/test_x.npy")[:40]
    y = np.load(workdir / "data/prepared/test_y.npy")[:40]
    status, body = post(served, {"inputs": x.tolist()})
    assert status == 200
    proba = np.array(body["predictions"])
    assert proba.shape == (40, 10) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    local = mlflow.pyfunc.load_model("models:/digits@champion").predict(x)
    assert np.allclose(proba, local, atol=1e-5)
    assert (proba.argmax(axis=1) == y).mean() > 0.5

    status, body = post(served, {"inputs": x[:, 0].tolist()})
    assert status == 400 and body["message"].endswith("(N, 1, 8, 8); got (40, 8, 8)")
    for wrong in ((x / 255.0).tolist(), np.full((2, 1, 8, 8), 300).tolist(), [[[["a"] * 8] * 8]]):
        status, body = post(served, {"inputs": wrong})
        assert status == 400 and "expected raw uint8 images" in body["message"], body


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"inputs": [[[[0, 255]]]]}, None),
        ({"instances": [[[[7]]]]}, None),
        ({"inputs": [[[[0.5]]]]}, "0.5"),
        ({"inputs": [[[[-1]]]]}, "-1"),
        ({"inputs": [[[[True]]]]}, "True"),
        ({"dataframe_split": {}}, None),
        ("not json", None),
    ],
)
def test_pixel_guard_names_the_first_value_that_is_not_a_uint8(
    payload: object, problem: str | None
) -> None:
    from cnnops.registry.serve import pixel_problem

    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    found = pixel_problem(body)
    assert found is None if problem is None else problem in found


def test_pixel_guard_names_a_wrong_image_shape() -> None:
    from cnnops.registry.serve import pixel_problem

    assert pixel_problem(json.dumps({"inputs": [[[[1] * 8] * 8]]}).encode(), (1, 8, 8)) is None
    found = pixel_problem(json.dumps({"inputs": [[[1] * 8] * 8]}).encode(), (1, 8, 8))
    assert found == "expected images of shape (N, 1, 8, 8); got (1, 8, 8)"
    ragged = json.dumps({"inputs": [[[[1, 2], [3]]]]}).encode()
    assert "ragged" in pixel_problem(ragged, (1, 2, 2))
