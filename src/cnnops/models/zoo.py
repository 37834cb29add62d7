"""torchvision architectures for any channel count and class count, from scratch or fine-tuned
from ImageNet weights in a file (`load_pretrained`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnops.errors import DataError


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps the parts transfer learning touches."""

    stem: str
    """The first convolution: adapted to the image's channel count."""
    heads: tuple[str, ...]
    """The classifier layers rebuilt for the dataset's classes (Inception-v3 has two)."""


LAYOUTS = {
    "resnet18": Layout("conv1", ("fc",)),
    "resnet50": Layout("conv1", ("fc",)),
    "vgg16": Layout("features.0", ("classifier.6",)),
    "inception_v3": Layout("Conv2d_1a_3x3.conv", ("fc", "AuxLogits.fc")),
    "efficientnet_b0": Layout("features.0.0", ("classifier.1",)),
    "mobilenet_v2": Layout("features.0.0", ("classifier.1",)),
}


class PoolTo(nn.Module):
    """Adaptive average pooling to `size` x `size` as two matrix products: the same averages,
    and exportable to ONNX from any input size (torch exports adaptive pooling from multiples
    of the output size only, which VGG-16 meets at 224 px alone)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Python ints: an exported graph holds the matrices of its one input size as constants.
        rows = self._bins(int(x.shape[-2]), x)
        cols = self._bins(int(x.shape[-1]), x)
        return rows @ x @ cols.T

    def _bins(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """(size, n): row i averages the inputs of output bin i, as adaptive pooling bins them."""
        m = torch.zeros(self.size, n, dtype=x.dtype, device=x.device)
        for i in range(self.size):
            start, end = (i * n) // self.size, -(-((i + 1) * n) // self.size)
            m[i, start:end] = 1.0 / (end - start)
        return m


def torchvision_net(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    small_input_stem: bool = False,
) -> nn.Module:
    """torchvision's `name` with a `num_classes` head behind dropout `dropout`, taking
    `in_channels` channels; ResNets take a 3x3 stem without max-pool if `small_input_stem`
    (CIFAR-sized images keep their resolution, He et al., 2016, sec. 4.2)."""
    import torchvision.models as tvm

    if name in ("resnet18", "resnet50"):
        net: nn.Module = getattr(tvm, name)(num_classes=num_classes)
        # Always wrapped, so the state dict's keys do not depend on the dropout rate.
        net.fc = nn.Sequential(nn.Dropout(dropout), net.get_submodule("fc"))
    elif name == "inception_v3":
        net = tvm.inception_v3(
            num_classes=num_classes, aux_logits=True, init_weights=True, dropout=dropout
        )
    else:
        net = getattr(tvm, name)(num_classes=num_classes, dropout=dropout)
    if name == "vgg16":
        net.avgpool = PoolTo(7)
    stem = net.get_submodule(LAYOUTS[name].stem)
    assert isinstance(stem, nn.Conv2d)
    if small_input_stem and name.startswith("resnet"):
        stem = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        stem = _conv_like(stem, in_channels)
    _set_submodule(net, LAYOUTS[name].stem, stem)
    return net


def is_head(name: str, parameter: str) -> bool:
    """Whether `parameter` (a name in the network's state dict) belongs to a new head."""
    return any(parameter.startswith(f"{head}.") for head in LAYOUTS[name].heads)


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


def _set_submodule(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def read_state_dict(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision-format weights file, loaded with `weights_only=True` after
    its sha256 is checked (when given). Every problem is a DataError naming the file."""
    from cnnops.checkpoints import sha256_file, why_unreadable

    if not path.is_file():
        raise DataError(
            f"{path}: model.weights: no such file; fetch it with `cnnops weights NAME` "
            "(or `dvc pull` where it is tracked)"
        )
    if sha256:
        got = sha256_file(path)
        if got != sha256:
            raise DataError(
                f"{path}: sha256 is {got}, model.weights_sha256 expects {sha256}; "
                "the file changed or is not the one named"
            )
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (every failure is the file's, said in one line)
        raise DataError(f"{path}: model.weights unreadable: {why_unreadable(path, e)}") from None
    for wrapper in ("state_dict", "model"):  # training scripts' checkpoints wrap it
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DataError(
            f"{path}: model.weights is not a state dict (parameter names to tensors); "
            "give a torchvision-format .pth"
        )
    return data


def load_pretrained(net: nn.Module, name: str, path: Path, sha256: str | None = None) -> None:
    """Load ImageNet weights from `path` into `net` (built by `torchvision_net`): every tensor
    but the new heads'; a one-channel stem takes the sum of the RGB kernels. A file that does
    not fit is a DataError naming the first key that differs."""
    weights = read_state_dict(path, sha256)
    stem = f"{LAYOUTS[name].stem}.weight"
    expected = {k: v for k, v in net.state_dict().items() if not is_head(name, k)}
    if stem in weights and stem in expected and expected[stem].shape[1] == 1:
        weights[stem] = weights[stem].sum(dim=1, keepdim=True)  # gray = R = G = B
    given = {k: v for k, v in weights.items() if not is_head(name, k)}
    for key, tensor in expected.items():
        if key not in given:
            raise DataError(f"{path}: does not fit {name}: it has no {key!r}")
        if given[key].shape != tensor.shape:
            raise DataError(
                f"{path}: does not fit {name}: {key!r} has shape {_shape(given[key])}, "
                f"{name} expects {_shape(tensor)}"
            )
    extra = [k for k in given if k not in expected]
    if extra:
        raise DataError(f"{path}: does not fit {name}: {extra[0]!r} is not one of its keys")
    net.load_state_dict(given, strict=False)
