"""The params.yaml schema: strict, frozen pydantic models, one section per stage."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from cnnops.errors import ConfigError

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    raw: Path = Path("data/raw")
    prepared: Path = Path("data/prepared")
    models: Path = Path("models")
    reports: Path = Path("reports")
    src: Path = Path("src/cnnops")
    """The package source, so dvc.yaml can declare each stage's code as a dependency."""


class Fetch(Section):
    source: Literal["digits", "mnist", "fashion-mnist", "cifar10", "imagefolder"] = "digits"
    mirror: str | None = None
    """Local folder or file:// URL holding the dataset's files; the canonical URL when unset."""
    url: str | None = None
    """imagefolder only: a directory, a file:// or http(s) URL of a .zip/.tar.gz of class folders."""
    sha256: str | None = None
    """imagefolder archives only: expected sha256 of the archive."""


class Prepare(Section):
    seed: int = 42
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    """Used only by sources without an official test set."""
    image_size: Annotated[int, Field(ge=4, le=1024)] | None = None
    """Resize every image to this square size; required for imagefolder, optional otherwise."""
    grayscale: bool | None = None
    """imagefolder only: force one channel (True) or three (False); detected when unset."""

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> Prepare:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves too little training data; keep the sum below 0.9"
            )
        return self


class ConvBlock(Section):
    filters: Annotated[int, Field(ge=1, le=4096)]
    kernel: Annotated[int, Field(ge=1, le=31)] = 3
    stride: Annotated[int, Field(ge=1, le=8)] = 1
    padding: Literal["valid", "same"] = "same"
    pool: bool = True
    """Follow this block with the model's pooling layer."""


class Pooling(Section):
    kind: Literal["max", "avg", "sum"] = "max"
    size: Annotated[int, Field(ge=2, le=8)] = 2


class Model(Section):
    name: str = "seed_cnn"
    conv: list[ConvBlock] = Field(
        default_factory=lambda: [ConvBlock(filters=32), ConvBlock(filters=64)], min_length=1
    )
    pooling: Pooling = Pooling()
    fc: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [128])
    batch_norm: bool = True
    dropout_conv: Fraction = 0.0
    dropout_fc: Fraction = 0.25
    noise_std: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    """Std of Gaussian noise added to hidden activations while training (0 disables)."""


class Optimizer(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    """L2 penalty, applied as decoupled weight decay (adamw) or coupled (adam, sgd)."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9


class Scheduler(Section):
    name: Literal["none", "cosine", "step", "onecycle"] = "cosine"
    step_size: Annotated[int, Field(ge=1)] = 10
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


class EarlyStopping(Section):
    enabled: bool = True
    monitor: Literal["val_loss", "val_acc"] = "val_loss"
    patience: Annotated[int, Field(ge=1)] = 5
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


class Train(Section):
    seed: int = 42
    max_epochs: Annotated[int, Field(ge=1, le=10000)] = 30
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64
    optimizer: Optimizer = Optimizer()
    scheduler: Scheduler = Scheduler()
    l1: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """L1 penalty on the weights, added to the loss."""
    early_stopping: EarlyStopping = EarlyStopping()
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] = "32"
    deterministic: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    label_smoothing: Fraction = 0.0


class Evaluate(Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


class Registry(Section):
    model_name: Annotated[str, Field(min_length=1, max_length=200)] = "cnnops"
    select_by: Literal["val_acc", "val_loss"] = "val_acc"
    """How `cnnops register` ranks the candidates (the train run, the tuning study's best trial)."""
    candidates: list[str] = Field(default_factory=lambda: ["train", "tune"], min_length=1)
    """Folders under paths.models holding a candidate's best.ckpt + run.json; absent ones are skipped."""
    metric: Literal["test_acc", "macro_f1"] = "test_acc"
    """The test metric the promotion gate compares."""
    min_delta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """The challenger replaces the champion only when better by at least this much."""
    onnx_atol: Annotated[float, Field(gt=0.0)] = 1e-4
    """Largest allowed |ONNX - PyTorch| difference of probabilities in the export parity check."""
    onnx_samples: Annotated[int, Field(ge=1)] = 100


class Mlflow(Section):
    experiment: str = "cnnops"
    tracking_uri: str = "sqlite:///mlflow.db"
    """Overridden by the MLFLOW_TRACKING_URI environment variable."""
    artifact_location: str = "mlartifacts"


class Config(Section):
    paths: Paths = Paths()
    fetch: Fetch = Fetch()
    prepare: Prepare = Prepare()
    model: Model = Model()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    registry: Registry = Registry()
    mlflow: Mlflow = Mlflow()

    @model_validator(mode="after")
    def _imagefolder_needs_size(self) -> Config:
        if self.fetch.source == "imagefolder" and self.prepare.image_size is None:
            raise ValueError("fetch.source: imagefolder needs prepare.image_size (e.g. 64)")
        return self


def _yaml() -> YAML:
    # DVC reads params with ruamel's YAML 1.2 rules, where 1e-3 is a float; PyYAML (1.1) would
    # read it as a string. Using the same reader keeps `dvc exp run -S` and `--set` in agreement.
    return YAML(typ="safe", pure=True)


def parse_value(text: str) -> Any:
    """Read one override value the way params.yaml would read it."""
    try:
        return _yaml().load(io.StringIO(text))
    except YAMLError:
        return text


def read_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = _yaml().load(path.read_text())
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _key_parts(key: str) -> list[str | int]:
    """`model.conv[0].kernel` or `model.conv.0.kernel` → ["model", "conv", 0, "kernel"]."""
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+", key):
        parts.append(int(token) if token.isdigit() else token)
    return parts


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b[0].c=value` to the nested params `data` in place."""
    key, sep, text = assignment.partition("=")
    parts = _key_parts(key.strip())
    if not sep or not parts:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.dropout_fc=0.3")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        try:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
        except (IndexError, KeyError, TypeError):
            where = key.strip().split("=")[0]
            raise ConfigError(f"--set {where}: no such element at {parts[: depth + 1]}") from None
    try:
        node[parts[-1]] = parse_value(text)
    except (IndexError, TypeError):
        raise ConfigError(f"--set {key.strip()}: cannot assign inside {type(node).__name__}") from None


def _format_error(source: str, data: dict[str, Any], err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in first["loc"])
    loc = loc.replace(".[", "[")
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r} (value {value!r}); check the spelling against `cnnops show-config`"
    where = f"{loc} = {value!r}" if loc else "params"
    return f"{source}: {where}: {first['msg']}"


def load_config(path: Path = Path("params.yaml"), overrides: list[str] | None = None) -> Config:
    """Load and validate params.yaml plus `--set` overrides; raise ConfigError naming the key."""
    data = read_params(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(str(path), data, e)) from None
    from cnnops.models import check_architecture

    check_architecture(config)
    return config


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into dotted keys, lists indexed as `conv.0.filters`."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict | list) and value:
            flat.update(flatten(value, f"{name}."))  # type: ignore[arg-type]
        else:
            flat[name] = value
    return flat
