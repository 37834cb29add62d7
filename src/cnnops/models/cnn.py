"""The seed CNN: conv blocks (conv, batch norm, ReLU, noise, pooling, dropout), then FC layers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cnnops.models import feature_sizes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cnnops.config import ConvBlock, Pooling


class SumPool2d(nn.Module):
    """Sum over each window: average pooling without the division."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.size, divisor_override=1)


class GaussianNoise(nn.Module):
    """Adds N(0, std²) to activations while training; the identity at evaluation."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x


def make_pool(pooling: Pooling) -> nn.Module:
    if pooling.kind == "max":
        return nn.MaxPool2d(pooling.size)
    if pooling.kind == "avg":
        return nn.AvgPool2d(pooling.size)
    return SumPool2d(pooling.size)


def conv_layers(
    block: ConvBlock,
    in_channels: int,
    pooling: Pooling,
    batch_norm: bool,
    noise_std: float,
    dropout: float,
) -> list[nn.Module]:
    pad: int | str = "same" if block.padding == "same" and block.stride == 1 else 0
    if block.padding == "same" and block.stride > 1:
        pad = block.kernel // 2
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, block.filters, block.kernel, block.stride, pad, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(block.filters))
    layers += [nn.ReLU(inplace=True), GaussianNoise(noise_std)]
    if block.pool:
        layers.append(make_pool(pooling))
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return layers


def fc_layers(
    in_features: int, width: int, batch_norm: bool, noise_std: float, dropout: float
) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, width, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(inplace=True), GaussianNoise(noise_std)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


class SeedCNN(nn.Module):
    """conv blocks → flatten → FC blocks → logits; `predict_proba` applies the softmax."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        *,
        conv: Sequence[ConvBlock],
        pooling: Pooling,
        fc: Sequence[int] = (128,),
        batch_norm: bool = True,
        dropout_conv: float = 0.0,
        dropout_fc: float = 0.25,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for block in conv:
            layers += conv_layers(block, channels, pooling, batch_norm, noise_std, dropout_conv)
            channels = block.filters
        self.features = nn.Sequential(*layers)
        shape = SimpleNamespace(conv=conv, pooling=pooling)
        size = feature_sizes(shape, image_size)[-1]  # type: ignore[arg-type]
        head: list[nn.Module] = [nn.Flatten()]
        width = channels * size * size
        for units in fc:
            head += fc_layers(width, units, batch_norm, noise_std, dropout_fc)
            width = units
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(dim=1)
