"""The registered model: raw uint8 images (N, C, H, W) in, class probabilities (N, K) out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    """Raw uint8 images (N, C, H, W) in, class probabilities (N, K) out; normalization inside.

    Every input is judged by `check_images`, whose one-line answer names the expected and the
    given dtype and shape. The signature declares no input schema for that reason: MLflow
    enforces an input schema before `predict` runs, and its refusal begins by printing the whole
    array. The expected input is documented instead in the model's metadata (`input`) and its
    input example. An empty batch is refused: a JSON request of no images (`[]`) has no
    shape to check, and refusing it here too keeps one rule for both ways in.
    """

    batch_size = 512

    def load_context(self, context: Any) -> None:
        # The network alone, not the LightningModule: importing Lightning was most of the load.
        from cnnops.registry.network import load_network

        self.model = load_network(Path(context.artifacts["checkpoint"]))

    # `np.ndarray` is the one hint MLflow neither complains about nor derives a schema from.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        x = check_images(model_input, self.model)
        return self.model.predict_images(x, self.batch_size)


def image_shape(model: Any) -> tuple[int, int, int]:
    """(C, H, W) of the images `model` (a Classifier or a registry Network) was trained on."""
    hp = model.hparams
    return (hp["in_channels"], hp["image_size"], hp["image_size"])


def expected_input(shape: tuple[int, ...]) -> str:
    """What a model of image `shape` (C, H, W) takes, in the words of its errors and metadata."""
    return f"raw uint8 images of shape (N, {', '.join(map(str, shape))})"


def images_problem(x: Any, shape: tuple[int, ...]) -> str | None:
    """Why `x` is not a batch of raw images of `shape` (C, H, W), in one line; None when it is.

    uint8 is the contract. A signed integer array of values 0..255 is taken as pixels too: it
    is what a list of pixel values becomes, whether a Python list or a JSON request's."""
    want = f"expected {expected_input(shape)}"
    try:
        x = np.asarray(x)
    except ValueError:  # nested lists of unequal lengths
        return f"{want}; got a ragged list"
    if x.ndim and len(x) == 0:
        return f"{want}; got an empty batch: send at least one image"
    got = f"{x.dtype} {tuple(x.shape)}"
    if x.dtype.kind == "i" and x.size and (x.min() < 0 or x.max() > 255):
        return f"{want}; got {got} with values outside 0..255"
    if x.dtype.kind == "f":
        return f"{want}; got {got}: pixel values are integers 0..255, not normalized floats"
    if (x.dtype != np.uint8 and x.dtype.kind != "i") or x.ndim != 4 or x.shape[1:] != shape:
        return f"{want}; got {got}"
    return None


def check_images(x: Any, model: Any) -> np.ndarray:
    """`x` as uint8 images of the shape `model` was trained on, or an MlflowException whose
    one-line message says what was expected and what came (see `images_problem`)."""
    from mlflow.exceptions import MlflowException

    problem = images_problem(x, image_shape(model))
    if problem is not None:
        raise MlflowException.invalid_parameter_value(problem)
    return np.asarray(x, dtype=np.uint8)


def signature(num_classes: int) -> Any:
    """Outputs only, probabilities (N, K): MLflow would enforce an input schema before
    `check_images` could answer (see `ImageClassifier`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))


def requirements() -> list[str]:
    # Stated, not inferred: inference loads the model in a subprocess, slow and fragile.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "lightning", "numpy", "mlflow")]
