"""torchvision architectures, trained from scratch, adapted to any channel count."""

from __future__ import annotations

from torch import nn

from cnnops.config import Model
from cnnops.models import register


@register("resnet18")
def resnet18(spec: Model, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18 as build

    net = build(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if image_size <= 64:
        # The ImageNet stem shrinks a 32x32 image to 8x8 before the first block; CIFAR-sized
        # inputs keep their resolution with a 3x3 stem and no max-pool (He et al., 2016, sec. 4.2).
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if spec.dropout_fc > 0:
        net.fc = nn.Sequential(nn.Dropout(spec.dropout_fc), net.fc)
    return net
