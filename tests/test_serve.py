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
    assert status == 400
    assert (
        body["message"] == "expected raw uint8 images of shape (N, 1, 8, 8); got uint8 (40, 8, 8)"
    )
    for wrong in ((x / 255.0).tolist(), np.full((2, 1, 8, 8), 300).tolist(), [[[["a"] * 8] * 8]]):
        status, body = post(served, {"inputs": wrong})
        assert status == 400 and "expected raw uint8 images" in body["message"], body


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"inputs": [[[[0, 255]]]]}, None),
        ({"instances": [[[[7, 8]]]]}, None),
        (
            {"inputs": [[[[0.5, 1]]]]},
            "got float64 (1, 1, 1, 2): pixel values are integers 0..255, not normalized floats",
        ),
        ({"inputs": [[[[-1, 1]]]]}, "got int64 (1, 1, 1, 2) with values outside 0..255"),
        ({"inputs": [[[[True, False]]]]}, "got bool (1, 1, 1, 2)"),
        ({"inputs": [[[[True, 3]]]]}, "got True among the pixel values"),
        ({"inputs": [[[["a", "b"]]]]}, "got <U1 (1, 1, 1, 2)"),
        ({"inputs": [[[0, 255]]]}, "got uint8 (1, 1, 2)"),
        ({"inputs": []}, "got an empty batch: send at least one image"),
        ({"inputs": [[[[1, 2], [3]]]]}, "got a ragged list"),
        ({"dataframe_split": {}}, None),
        ("not json", None),
    ],
)
def test_pixel_guard_answers_a_json_payload_in_the_model_s_words(
    payload: object, problem: str | None
) -> None:
    from cnnops.registry.serve import pixel_problem

    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    expected = problem and f"expected raw uint8 images of shape (N, 1, 1, 2); {problem}"
    assert pixel_problem(body, (1, 1, 2)) == expected


@pytest.mark.parametrize(
    "images",
    [
        np.arange(16, dtype=np.uint8).reshape(2, 1, 2, 4),
        np.arange(16, dtype=np.uint8).reshape(2, 2, 4),
        np.zeros((2, 3, 2, 4), dtype=np.uint8),
        np.linspace(0, 1, 16).reshape(2, 1, 2, 4),
        np.arange(16, dtype=np.int64).reshape(2, 1, 2, 4) * 100,
        np.zeros((0, 1, 2, 4), dtype=np.uint8),
    ],
)
def test_a_request_gets_the_message_predict_gives_for_the_same_pixels(images: np.ndarray) -> None:
    from cnnops.registry.model import images_problem
    from cnnops.registry.serve import pixel_problem

    body = json.dumps({"inputs": images.tolist()}).encode()
    assert pixel_problem(body, (1, 2, 4)) == images_problem(images, (1, 2, 4))
