"""Models by registered name, built through one factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cnnops.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from cnnops.config import Config, Model

Builder = Callable[["Model", int, int, int], "nn.Module"]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def model_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def build_model(spec: Model, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build `spec.name` for square images of `in_channels` channels; the model returns logits."""
    _load_builtins()
    if spec.name not in _REGISTRY:
        raise ConfigError(
            f"model.name = {spec.name!r}: unknown model; choose one of {model_names()}"
        )
    return _REGISTRY[spec.name](spec, in_channels, num_classes, image_size)


def check_architecture(config: Config) -> None:
    """Fail early, naming the key, when a layer does not fit the feature map it receives."""
    from cnnops.data.sources import input_size

    if config.model.name not in model_names():
        raise ConfigError(
            f"model.name = {config.model.name!r}: unknown model; choose one of {model_names()}"
        )
    if config.model.name == "seed_cnn":
        from cnnops.models.cnn import feature_sizes

        feature_sizes(config.model, input_size(config))


def _load_builtins() -> None:
    from cnnops.models import cnn, zoo  # noqa: F401  (registers on import)
