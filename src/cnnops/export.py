"""ONNX export of a trained classifier (raw uint8 in, probabilities out) and its parity check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cnnops.module import Classifier


class Probabilities(torch.nn.Module):
    """The exported graph: normalization, network and softmax, so ONNX takes raw pixels too."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.predict_proba(x)


def to_onnx(classifier: Classifier, example: np.ndarray, path: Path) -> Path:
    """Write `classifier` as ONNX to `path`, batch dimension dynamic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = Probabilities(classifier.eval()).eval()
    # The TorchScript exporter: the dynamo one needs onnxscript, which the pipeline does not ship.
    torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=["probabilities"],
        opset_version=17,
        dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
    )
    return path


def max_abs_diff(path: Path, predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> float:
    """Largest |onnxruntime - reference| over the probabilities of images `x`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x})[0]
    return float(np.abs(got - np.asarray(predict(x))).max())
