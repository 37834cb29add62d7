"""The seed CNN: conv blocks (conv, batch norm, ReLU, noise, pooling, dropout), then FC layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnops.config import ConvBlock, Model, Pooling
from cnnops.errors import ConfigError
from cnnops.models import register


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


def conv_out(size: int, block: ConvBlock) -> int:
    if block.padding == "same" and block.stride == 1:
        return size
    pad = block.kernel // 2 if block.padding == "same" else 0
    return (size + 2 * pad - block.kernel) // block.stride + 1


def feature_sizes(spec: Model, size: int) -> list[int]:
    """Spatial size after each conv block; raises ConfigError for a layer that does not fit."""
    sizes = []
    for i, block in enumerate(spec.conv):
        if block.padding == "valid" and block.kernel > size:
            raise ConfigError(
                f"model.conv[{i}].kernel = {block.kernel}: larger than the {size}x{size} feature map "
                f"it receives; use kernel <= {size}, padding: same, or fewer pooling steps"
            )
        size = conv_out(size, block)
        if block.pool:
            if spec.pooling.size > size:
                raise ConfigError(
                    f"model.pooling.size = {spec.pooling.size}: larger than the {size}x{size} feature "
                    f"map after model.conv[{i}]; set model.conv[{i}].pool: false or a smaller size"
                )
            size //= spec.pooling.size
        sizes.append(size)
    return sizes


def conv_layers(spec: Model, i: int, in_channels: int) -> list[nn.Module]:
    block = spec.conv[i]
    pad: int | str = "same" if block.padding == "same" and block.stride == 1 else 0
    if block.padding == "same" and block.stride > 1:
        pad = block.kernel // 2
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, block.filters, block.kernel, block.stride, pad, bias=not spec.batch_norm
        )
    ]
    if spec.batch_norm:
        layers.append(nn.BatchNorm2d(block.filters))
    layers += [nn.ReLU(inplace=True), GaussianNoise(spec.noise_std)]
    if block.pool:
        layers.append(make_pool(spec.pooling))
    if spec.dropout_conv > 0:
        layers.append(nn.Dropout2d(spec.dropout_conv))
    return layers


def fc_layers(spec: Model, in_features: int, width: int) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, width, bias=not spec.batch_norm)]
    if spec.batch_norm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(inplace=True), GaussianNoise(spec.noise_std)]
    if spec.dropout_fc > 0:
        layers.append(nn.Dropout(spec.dropout_fc))
    return layers


class SeedCNN(nn.Module):
    """conv blocks → flatten → FC blocks → logits; `predict_proba` applies the softmax."""

    def __init__(self, spec: Model, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, block in enumerate(spec.conv):
            layers += conv_layers(spec, i, channels)
            channels = block.filters
        self.features = nn.Sequential(*layers)
        size = feature_sizes(spec, image_size)[-1]
        head: list[nn.Module] = [nn.Flatten()]
        width = channels * size * size
        for units in spec.fc:
            head += fc_layers(spec, width, units)
            width = units
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(dim=1)


@register("seed_cnn")
def seed_cnn(spec: Model, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return SeedCNN(spec, in_channels, num_classes, image_size)
