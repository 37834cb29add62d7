"""The architectures: what each needs of its input, known without importing torch, and the one
factory that builds them (`build_model`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnops.config import SeedCnn, Zoo
from cnnops.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from cnnops.config import Config, ConvBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    """What a torchvision architecture needs of its input."""

    native_size: int
    """The square size its ImageNet weights were trained at."""
    min_size: int
    """The smallest square input it can take."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """The normalization its ImageNet weights expect, per RGB channel (fractions of 255)."""
    std: tuple[float, ...] = IMAGENET_STD


ZOO = {
    "resnet18": Architecture(224, 16),
    "resnet50": Architecture(224, 16),
    "vgg16": Architecture(224, 32),
    # Google's weights take pixels scaled to [-1, 1] (torchvision's transform_input does this).
    "inception_v3": Architecture(299, 299, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "efficientnet_b0": Architecture(224, 16),
    "mobilenet_v2": Architecture(224, 16),
}


def conv_out(size: int, block: ConvBlock) -> int:
    if block.padding == "same" and block.stride == 1:
        return size
    pad = block.kernel // 2 if block.padding == "same" else 0
    return (size + 2 * pad - block.kernel) // block.stride + 1


def feature_sizes(spec: SeedCnn, size: int) -> list[int]:
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


def net_input_size(spec: SeedCnn | Zoo, image_size: int) -> int:
    """The square size the network sees: `input_size` when set, the native size of pretrained
    weights, else the prepared images' own size."""
    if not isinstance(spec, Zoo):
        return image_size
    if spec.input_size:
        return spec.input_size
    return ZOO[spec.name].native_size if spec.weights else image_size


def normalization(
    spec: SeedCnn | Zoo, channels: int, mean: list[float], std: list[float]
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std the network's input is standardized with: those the weights
    were trained with when there are weights (averaged for one channel), else the data's."""
    if not isinstance(spec, Zoo) or spec.weights is None:
        return mean, std
    arch = ZOO[spec.name]
    if channels == 1:
        return [sum(arch.mean) / 3], [sum(arch.std) / 3]
    return list(arch.mean), list(arch.std)


def check_architecture(config: Config) -> None:
    """Fail early, naming the key, when the network cannot take the images it will receive."""
    from cnnops.data.sources import input_size

    spec, size = config.model, input_size(config)
    if not isinstance(spec, Zoo):
        feature_sizes(spec, size)
        return
    arch, seen = ZOO[spec.name], net_input_size(spec, size)
    if seen < arch.min_size:
        key = "model.input_size" if spec.input_size else "prepare.image_size"
        raise ConfigError(
            f"{key} = {seen}: {spec.name} takes images of at least {arch.min_size}x"
            f"{arch.min_size}; set model.input_size (the network's side, resized on the device; "
            f"its native size is {arch.native_size}) or prepare.image_size"
        )


def check_study(config: Config) -> None:
    """`check_architecture`, and no study over a lever the model lacks (`check_levers`): what
    every command that may run the tune stage checks first."""
    from cnnops.config import check_levers

    check_architecture(config)
    check_levers(config)


def build_model(
    spec: SeedCnn | Zoo, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    """Build `spec`'s network for square images of `in_channels` channels, `image_size` pixels
    (the network's own input size); the model returns logits. Pretrained weights are loaded
    separately (`cnnops.models.zoo.load_pretrained`)."""
    if isinstance(spec, SeedCnn):
        from cnnops.models.cnn import SeedCNN

        return SeedCNN(
            in_channels,
            num_classes,
            image_size,
            conv=spec.conv,
            pooling=spec.pooling,
            fc=spec.fc,
            batch_norm=spec.batch_norm,
            dropout_conv=spec.dropout_conv,
            dropout_fc=spec.dropout_fc,
            noise_std=spec.noise_std,
        )
    from cnnops.models.zoo import torchvision_net

    return torchvision_net(
        spec.name,
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=spec.dropout,
        # From scratch, a CIFAR-sized image keeps its resolution through a small stem.
        small_input_stem=spec.weights is None and image_size <= 64,
    )
