"""A registered model's network, rebuilt from its checkpoint for prediction, without Lightning.

`mlflow.pyfunc.load_model` spent most of its time importing Lightning (and the torchmetrics,
torchvision and scipy it imports in turn) to rebuild a `LightningModule` that prediction never
trains. `Network` takes the same checkpoint state and computes what `cnnops.module.Classifier`
computes in eval mode, with torch and the architecture alone; tests/test_pyfunc.py checks that
the two give the same probabilities. `benchmarks/load_champion.py` measures the load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnops.checkpoints import rebuild
from cnnops.config import parse_model
from cnnops.models import build_model, net_input_size


class Network(torch.nn.Module):
    """The trained network behind its input normalization: uint8 images in, probabilities out.

    Its state (`net.*`, `mean`, `std`) is the Classifier's, so a checkpoint loads strictly."""

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams = hparams
        spec = parse_model(hparams["model"])
        self.input_size = net_input_size(spec, hparams["image_size"])
        self.net = build_model(
            spec, hparams["in_channels"], hparams["num_classes"], self.input_size
        )
        mean = torch.tensor(hparams["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(hparams["std"]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        # The Classifier's own folding of (x / 255 - mean) / std, so results agree to the bit.
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """As `Classifier.normalize`: uint8 pixels standardized, resized to the network's side."""
        if x.dtype == torch.uint8:
            x = torch.addcmul(self.shift, x.float(), self.scale)  # type: ignore[arg-type]
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
        return x

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x)).float().softmax(dim=1)

    @torch.inference_mode()
    def predict_images(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class probabilities (N, K), float32, of uint8 images (N, C, H, W), a batch at a time."""
        chunks = np.split(x, range(batch_size, len(x), batch_size))
        parts = [self.predict_proba(torch.from_numpy(np.ascontiguousarray(c))) for c in chunks]
        return torch.cat(parts).numpy()


def load_network(path: Path) -> Network:
    """The network of the Lightning checkpoint at `path`, on the CPU, in eval mode; an unreadable
    or foreign checkpoint is the DataError `cnnops.checkpoints.load_classifier` gives."""
    return rebuild(Network, path)
