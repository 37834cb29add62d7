"""The registered model: raw uint8 images (N, C, H, W) in, class probabilities (N, K) out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from cnnops.module import Classifier


class ImageClassifier(PythonModel):
    """Raw uint8 images (N, C, H, W) in, class probabilities (N, K) out; normalization inside."""

    batch_size = 512

    def load_context(self, context: Any) -> None:
        from cnnops.checkpoints import load_classifier

        self.model = load_classifier(Path(context.artifacts["checkpoint"])).eval()

    # `np.ndarray` is the one hint MLflow neither complains about nor derives a schema from.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        x = check_images(np.asarray(model_input), self.model)
        return self.model.predict_images(x, self.batch_size)


def image_shape(model: Classifier) -> tuple[int, int, int]:
    hp = model.hparams
    return (hp["in_channels"], hp["image_size"], hp["image_size"])


def check_images(x: np.ndarray, model: Classifier) -> np.ndarray:
    """Refuse anything but raw uint8 pixels of the trained shape, saying what came instead."""
    from mlflow.exceptions import MlflowException

    shape = image_shape(model)
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise MlflowException.invalid_parameter_value(
            f"expected raw uint8 images of shape (N, {', '.join(map(str, shape))}); "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    return x


def signature(shape: tuple[int, ...], num_classes: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def requirements() -> list[str]:
    # Stated, not inferred: inference loads the model in a subprocess, slow and fragile.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "lightning", "numpy", "mlflow")]
