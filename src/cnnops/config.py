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
    strategy: Literal["auto", "ddp"] = "auto"
    """ddp: one process per device (plain DDP, re-launching the command); gloo on CPU, NCCL on GPU."""
    sync_batchnorm: bool = False
    """With ddp: batch-norm statistics computed over the global batch."""
    precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] = "32"
    deterministic: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    compile: bool = False
    """torch.compile the network (pays off on GPU for long runs; warm-up takes seconds)."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each training step's forward and backward pass from a CUDA graph. auto: on for one
    CUDA device without torch.compile or 16-mixed precision; true insists (an error elsewhere)."""
    channels_last: bool = True
    """NHWC memory format for convolutions on CUDA (tensor-core friendly)."""
    label_smoothing: Fraction = 0.0


class Transform(Section):
    name: str
    """An entry of the augmentation vocabulary (`cnnops.augment.VOCABULARY`)."""
    p: Probability = 0.5
    params: dict[str, float] = Field(default_factory=dict)
    """Magnitudes by the entry's parameter names; unset ones take the vocabulary default."""


class Augment(Section):
    strength: Probability = 1.0
    """Scales every magnitude in `transforms` (0 leaves images unchanged; flips keep their p)."""
    transforms: list[Transform] = Field(default_factory=list)
    """Applied in order to each training image."""
    engine: Literal["auto", "batched", "albumentations"] = "auto"
    """batched: whole batches on the training device (the fast path); albumentations: per image
    in DataLoader workers; auto: batched whenever every transform has a batched implementation."""


class Evaluate(Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


Range = tuple[float, float]


class Space(Section):
    """Ranges of the tuned levers; the names and their scales are fixed in `cnnops.tune`."""

    dropout_conv: Range | None = (0.0, 0.5)
    dropout_fc: Range | None = (0.0, 0.6)
    weight_decay: Range | None = (1e-6, 1e-2)
    """Sampled on a log scale."""
    l1: Range | None = (0.0, 1e-4)
    batch_norm: list[bool] | None = Field(default_factory=lambda: [True, False], min_length=1)
    noise_std: Range | None = (0.0, 0.3)
    augment_strength: Range | None = (0.0, 1.0)
    """Applied as augment.strength once the config has an augment section."""
    lr: Range | None = (1e-4, 1e-2)
    """Sampled on a log scale."""

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> Space:
        for name, value in self:
            if isinstance(value, tuple) and value[0] > value[1]:
                raise ValueError(f"{name}: low {value[0]:g} is above high {value[1]:g}")
            if name in ("weight_decay", "lr") and value and value[0] <= 0:
                raise ValueError(f"{name}: a log-scale range must start above 0, got {value[0]:g}")
        return self


class Sampler(Section):
    name: Literal["tpe"] = "tpe"
    seed: int = 42
    """Each worker's sampler is seeded from this, its worker number and the trials so far, so
    no two parallel workers or reruns draw the same points (`cnnops.tune.open_study`)."""
    startup_trials: Annotated[int, Field(ge=0)] = 8
    """Random trials before TPE starts modelling."""


class Pruner(Section):
    name: Literal["median", "hyperband", "none"] = "median"
    startup_trials: Annotated[int, Field(ge=0)] = 4
    """Trials that finish unpruned before the median pruner starts pruning."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 2
    """Epochs of each trial that are never pruned."""


class Tune(Section):
    n_trials: Annotated[int, Field(ge=1)] = 20
    """Finished (complete + pruned) trials the study ends with, over all workers and reruns."""
    timeout: Annotated[float, Field(gt=0)] | None = None
    """Seconds after which a `cnnops tune` run starts no new trial."""
    metric: Literal["val_loss", "val_acc"] = "val_loss"
    """Validation metric to optimize; it also drives each trial's early stopping and checkpoint."""
    direction: Literal["minimize", "maximize"] | None = None
    """Derived from the metric when unset."""
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    storage: str | None = None
    """A journal file, or an RDB URL (postgresql://...); models/optuna/studies.journal if unset."""
    study_name: str | None = None
    """Derived from the search space, the trial settings and the data when unset."""
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    start_from_params: bool = True
    """A new study's first trial runs the levers' own values from params (those inside their
    ranges), so the study's best is never worse than the configuration it starts from."""
    space: Space = Space()

    @model_validator(mode="after")
    def _direction_fits_metric(self) -> Tune:
        if self.direction and self.direction != self.goal:
            raise ValueError(f"direction {self.direction!r} contradicts metric {self.metric!r}")
        return self

    @property
    def goal(self) -> Literal["minimize", "maximize"]:
        return "maximize" if self.metric.endswith("acc") else "minimize"


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
    augment: Augment = Augment()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    tune: Tune = Tune()

    registry: Registry = Registry()
    mlflow: Mlflow = Mlflow()

    @model_validator(mode="after")
    def _sync_batchnorm_needs_gpus(self) -> Config:
        if self.train.sync_batchnorm and self.train.accelerator == "cpu":
            raise ValueError(
                "train.sync_batchnorm = true: PyTorch's SyncBatchNorm runs on GPUs only; "
                "set it false with accelerator: cpu"
            )
        return self

    @model_validator(mode="after")
    def _imagefolder_needs_size(self) -> Config:
        if self.fetch.source == "imagefolder" and self.prepare.image_size is None:
            raise ValueError("fetch.source: imagefolder needs prepare.image_size (e.g. 64)")
        return self


def _yaml() -> YAML:
    # DVC reads params with ruamel's YAML 1.2 rules, where 1e-3 is a float; PyYAML (1.1) would
    # read it as a string. Using the same reader keeps `dvc exp run -S` and `--set` in agreement.
    return YAML(typ="safe", pure=True)


def dump_yaml(data: Any) -> str:
    """`data` as block-style YAML, written by the same ruamel rules that read params."""
    stream = io.StringIO()
    yaml = _yaml()
    yaml.default_flow_style = False
    yaml.dump(data, stream)
    return stream.getvalue()


def dump_config(config: Config) -> str:
    return dump_yaml(config.model_dump(mode="json"))


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
        raise ConfigError(
            f"--set {key.strip()}: cannot assign inside {type(node).__name__}"
        ) from None


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
    if config.augment.transforms:  # only then is Albumentations worth importing
        from cnnops.augment import check_spec

        check_spec(config.augment)
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
