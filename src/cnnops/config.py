"""The params.yaml schema: strict, frozen pydantic models, one section per stage."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML, YAMLError

from cnnops.errors import ConfigError

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Folders relative to the project (the folder holding the params file); `check_paths`
    keeps the data and output folders inside it, apart from each other and from the code."""

    raw: Path = Path("data/raw")
    prepared: Path = Path("data/prepared")
    models: Path = Path("models")
    reports: Path = Path("reports")
    src: Path = Path("src/cnnops")
    """The package source, so dvc.yaml can declare each stage's code as a dependency."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # Path("") is Path("."): the project itself, which a stage would then replace.
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("empty; give a relative path inside the project, e.g. data/prepared")
        return value


DATA_PATHS = ("raw", "prepared", "models", "reports")
"""The `paths` keys stages write to (and may replace); `src` is only read."""


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
    min_side: Annotated[int, Field(ge=1, le=4096)] = 8
    """imagefolder only: an image whose shorter side is below this is a bad file."""
    on_bad_file: Literal["error", "skip"] = "error"
    """imagefolder only: error lists every bad file and stops; skip goes on without them and
    lists each with its reason in reports/data.json."""
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    """Decoding processes; 0 takes one per CPU core."""

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


COMMON_LEVERS = frozenset({"weight_decay", "l1", "augment_strength", "lr"})
"""Tuning levers every architecture honours: they act on the optimizer, the loss or the data."""


class SeedCnn(Section):
    """The seed CNN, built from params: conv blocks, pooling, FC layers, softmax."""

    name: Literal["seed_cnn"] = "seed_cnn"
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

    levers: ClassVar[frozenset[str]] = COMMON_LEVERS | {
        "dropout_conv",
        "dropout_fc",
        "batch_norm",
        "noise_std",
    }


class Zoo(Section):
    """A torchvision architecture: from scratch, or fine-tuned from ImageNet weights in a file."""

    name: str
    weights: Path | None = None
    """A torchvision-format state dict (`cnnops weights NAME` fetches one); None trains from
    scratch. Relative to the project folder; track it with DVC."""
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    """Checked before loading. Setting it also makes DVC see new weights as a params change."""
    freeze: Literal["none", "backbone"] = "none"
    """backbone: train the new head only (batch norm statistics frozen too) ..."""
    unfreeze_epoch: Annotated[int, Field(ge=1, le=10000)] | None = None
    """... then the whole network from this epoch (0-based); None keeps the backbone frozen."""
    dropout: Fraction = 0.0
    """Dropout before the new classifier head."""
    input_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    """The square size the network sees; batches are resized on the device when the prepared
    images differ. Default: the architecture's native size with weights, else the data's size."""

    levers: ClassVar[frozenset[str]] = COMMON_LEVERS | {"dropout"}

    @model_validator(mode="after")
    def _schedule_needs_weights(self) -> Zoo:
        if self.weights_sha256 and self.weights is None:
            raise ValueError(
                "model.weights_sha256 = '…': set, but model.weights is not; name the weights file"
            )
        if self.freeze == "backbone" and self.weights is None:
            raise ValueError(
                "model.freeze = 'backbone': needs model.weights, a random backbone frozen learns "
                "nothing; set model.weights or freeze: none"
            )
        if self.unfreeze_epoch is not None and self.freeze != "backbone":
            raise ValueError(
                f"model.unfreeze_epoch = {self.unfreeze_epoch}: needs freeze: backbone "
                "(nothing is frozen)"
            )
        return self


class Resnet18(Zoo):
    name: Literal["resnet18"] = "resnet18"


class Resnet50(Zoo):
    name: Literal["resnet50"] = "resnet50"


class Vgg16(Zoo):
    name: Literal["vgg16"] = "vgg16"
    dropout: Fraction = 0.5


class InceptionV3(Zoo):
    """Trained with its auxiliary classifier (loss weight 0.4); exported without it."""

    name: Literal["inception_v3"] = "inception_v3"
    dropout: Fraction = 0.5


class EfficientNetB0(Zoo):
    name: Literal["efficientnet_b0"] = "efficientnet_b0"
    dropout: Fraction = 0.2


class MobileNetV2(Zoo):
    name: Literal["mobilenet_v2"] = "mobilenet_v2"
    dropout: Fraction = 0.2


ARCHITECTURES: dict[str, type[SeedCnn | Zoo]] = {
    cls.model_fields["name"].default: cls
    for cls in (SeedCnn, Resnet18, Resnet50, Vgg16, InceptionV3, EfficientNetB0, MobileNetV2)
}
"""Each architecture's section by `model.name`."""


def _model_name(value: Any) -> str:
    name = value.get("name", "seed_cnn") if isinstance(value, dict) else value.name
    return name if name in ARCHITECTURES else "unknown"


Model = Annotated[
    Annotated[SeedCnn, Tag("seed_cnn")]
    | Annotated[Resnet18, Tag("resnet18")]
    | Annotated[Resnet50, Tag("resnet50")]
    | Annotated[Vgg16, Tag("vgg16")]
    | Annotated[InceptionV3, Tag("inception_v3")]
    | Annotated[EfficientNetB0, Tag("efficientnet_b0")]
    | Annotated[MobileNetV2, Tag("mobilenet_v2")],
    Discriminator(_model_name),
]
"""`model`: one section per architecture, told apart by `name` (seed_cnn when unset), so each
accepts only its own keys."""


def parse_model(data: dict[str, Any]) -> SeedCnn | Zoo:
    """A `model` section from its dumped form (as a checkpoint's hyperparameters hold it)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Model).validate_python(data)  # type: ignore[no-any-return]


class Optimizer(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    """L2 penalty, applied as decoupled weight decay (adamw) or coupled (adam, sgd)."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    backbone_lr_mult: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Pretrained architectures: the backbone's learning rate is lr times this; the new head
    takes lr itself."""
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    """The rule for the global batch under DDP (train.batch_size is per device, so N devices
    step on N x batch_size images): none keeps lr; sqrt multiplies it by sqrt(N) (suits Adam);
    linear by N (Goyal et al., for SGD; pair it with a warm-up)."""


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
    """gpu/cuda need a CUDA GPU here (checked at load, see `check_runtime`)."""
    devices: Annotated[int, Strict(), Field(ge=1, le=1024)] | Literal["auto"] = 1
    """Devices per run: at most the GPUs present when the accelerator is or resolves to GPU."""
    strategy: Literal["auto", "ddp"] = "auto"
    """ddp: one process per device (plain DDP, re-launching the command); gloo on CPU, NCCL on GPU."""
    sync_batchnorm: bool = False
    """With ddp: batch-norm statistics computed over the global batch."""
    precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] = "32"
    deterministic: bool = False
    cudnn_benchmark: bool = False
    """Let cuDNN time its convolution algorithms on the first batch of each shape and keep the
    fastest (`torch.backends.cudnn.benchmark`): seconds of warm-up that a long run earns back.
    Not with `deterministic`."""
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    data_placement: Literal["auto", "device", "host", "disk"] = "auto"
    """Where training batches come from: device (the split resident on the GPU), host (pinned
    memory, copied asynchronously), disk (memory-mapped arrays read in chunks by workers).
    auto picks the first that fits."""
    compile: bool = False
    """torch.compile the network (pays off on GPU for long runs; warm-up takes seconds)."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each training step's forward and backward pass from a CUDA graph. auto: on for one
    CUDA device without torch.compile or 16-mixed precision; true insists (an error elsewhere)."""
    cuda_graphs_optimizer: bool | Literal["auto"] = False
    """Capture the optimizer step in that graph too (torch's fused Adam/AdamW/SGD update, the
    learning rate read from a device tensor the schedule's value is copied into before each
    step). auto: wherever the training step is captured, the schedule changes only the learning
    rate (not onecycle, which cycles the momentum every step) and nothing inspects gradients
    between backward and the update; eager elsewhere. true insists (an error elsewhere)."""
    channels_last: bool = True
    """NHWC memory format for convolutions on CUDA (tensor-core friendly)."""
    label_smoothing: Fraction = 0.0

    @field_validator("cuda_graphs", "cuda_graphs_optimizer", mode="wrap")
    @classmethod
    def _true_false_or_auto(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("expected true, false or auto") from None

    @model_validator(mode="after")
    def _benchmark_is_not_deterministic(self) -> Train:
        if self.cudnn_benchmark and self.deterministic:
            raise ValueError(
                "train.cudnn_benchmark = true: cuDNN's timed choice of algorithms is not "
                "deterministic, and train.deterministic is true; turn one of them off"
            )
        return self

    @model_validator(mode="after")
    def _captured_optimizer_needs_a_captured_step(self) -> Train:
        if self.cuda_graphs_optimizer is not True:
            return self
        shown = "train.cuda_graphs_optimizer = true"
        if self.cuda_graphs is False:
            raise ValueError(
                f"{shown}: the optimizer step is captured with the training step, which "
                "train.cuda_graphs = false keeps eager; use auto or false"
            )
        if self.scheduler.name == "onecycle":
            raise ValueError(
                f"{shown}: train.scheduler.name = 'onecycle' changes the momentum every step, "
                "which a captured optimizer step cannot follow; use auto (eager under onecycle) "
                "or a cosine, step or no schedule"
            )
        return self


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


# Strict: a range is two numbers (YAML ints or floats), a choice a true/false, never a string
# or a bool that pydantic would otherwise coerce.
Number = Annotated[float, Strict()]
Range = tuple[Number, Number]

# Each tuned lever's config key, and those sampled on a log scale (`cnnops.tune` uses these).
LEVERS = {
    "dropout_conv": "model.dropout_conv",
    "dropout_fc": "model.dropout_fc",
    "dropout": "model.dropout",
    "weight_decay": "train.optimizer.weight_decay",
    "l1": "train.l1",
    "batch_norm": "model.batch_norm",
    "noise_std": "model.noise_std",
    "augment_strength": "augment.strength",
    "lr": "train.optimizer.lr",
}
LOG_SCALE = frozenset({"weight_decay", "lr"})


class Space(Section):
    """Ranges of the tuned levers ([low, high], or the choices of batch_norm); null leaves a
    lever out of the search. `check_space` checks each end is a valid value of its lever.
    A lever the model does not honour (`levers` of its section) is left out while at its
    default here, and refused when set."""

    dropout_conv: Range | None = (0.0, 0.5)
    dropout_fc: Range | None = (0.0, 0.6)
    dropout: Range | None = (0.0, 0.5)
    """The dropout before a pretrained architecture's head."""
    weight_decay: Range | None = (1e-6, 1e-2)
    """Sampled on a log scale."""
    l1: Range | None = (0.0, 1e-4)
    batch_norm: list[Annotated[bool, Strict()]] | None = Field(
        default_factory=lambda: [True, False], min_length=1
    )
    noise_std: Range | None = (0.0, 0.3)
    augment_strength: Range | None = (0.0, 1.0)
    """Applied as augment.strength once the config has an augment section."""
    lr: Range | None = (1e-4, 1e-2)
    """Sampled on a log scale."""

    @field_validator("*", mode="after")
    @classmethod
    def _range_is_usable(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, tuple):
            return value
        low, high = value
        if low > high:
            raise ValueError(f"low {low:g} is above high {high:g}; write the range as [low, high]")
        if low == high:
            raise ValueError(
                f"low equals high ({low:g}), an empty range; to fix the lever, set it in its "
                f"section and tune.space.{info.field_name}: null"
            )
        if info.field_name in LOG_SCALE and low <= 0:
            raise ValueError(f"a log-scale range must start above 0, got {low:g}")
        return value


class Sampler(Section):
    name: Literal["tpe"] = "tpe"
    seed: int = 42
    """Each worker's sampler is seeded from this, its worker number and the trials so far, so
    no two parallel workers or reruns draw the same points (`cnnops.tune.open_study`)."""
    startup_trials: Annotated[int, Field(ge=0)] = 8
    """Random trials before TPE starts modelling."""


class Pruner(Section):
    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    """median: below the median of finished trials at the same epoch. successive_halving:
    after epochs w + 1, 3w + 1, 9w + 1... (w = warmup_epochs, at least 1: epochs 2, 4, 10 for 1),
    outside the best third of the trials that got there; it needs no finished trials, so it
    prunes from the first (trials trained at once included). hyperband: several
    successive-halving brackets."""
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
    trials_at_once: Annotated[int, Field(ge=1, le=64)] = 1
    """Trials each worker trains together on the same batches, their steps side by side on the
    device, captured as one CUDA graph (`cnnops.fused`); 1 trains them one at a time."""
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
    """How `cnnops register` ranks the candidates (the train run, the tuning study's best trial);
    a tie goes to the other validation metric (lower val_loss, or higher val_acc)."""
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
    model: Model = SeedCnn()
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
    def _schedule_fits_model(self) -> Config:
        opt = self.train.optimizer
        if opt.backbone_lr_mult != 1.0 and not isinstance(self.model, Zoo):
            raise ValueError(
                f"train.optimizer.backbone_lr_mult = {opt.backbone_lr_mult:g}: {self.model.name} "
                "has no pretrained backbone; leave it at 1 or pick a torchvision architecture"
            )
        unfreeze = getattr(self.model, "unfreeze_epoch", None)
        if unfreeze is not None and self.train.strategy == "ddp":
            raise ValueError(
                f"model.unfreeze_epoch = {unfreeze}: DDP fixes the trained parameters when it "
                "starts; with strategy: ddp keep the backbone frozen (no unfreeze_epoch) or free"
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


Where = Callable[[str], str]
"""Where a dotted key's value came from: `--set KEY=VALUE` or the params file."""


def _where(path: Path, overrides: list[str]) -> Where:
    """Blame the last `--set` that assigned the key (or a section above it), else the file."""
    from cnnops.team import mask

    # Quoted back in errors: a password someone put in a URL is not repeated.
    assigned = [(_key_parts(a.partition("=")[0]), mask(a.strip())) for a in overrides]

    def where(key: str) -> str:
        parts = _key_parts(key)
        for target, assignment in reversed(assigned):
            if target and parts[: len(target)] == target:
                return f"--set {assignment}"
        # A check of a whole section (say prepare's fractions) may be tripped by a --set inside.
        inside = [a for t, a in assigned if len(t) > len(parts) and t[: len(parts)] == parts]
        return f"{path} with --set {', '.join(inside)}" if inside else str(path)

    return where


def _loc(parts: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _section_class(cls: type[BaseModel], part: str) -> type[BaseModel] | None:
    """The section class a key of `cls` holds (directly, in a list, or as an optional)."""
    import typing

    field = cls.model_fields.get(part)
    todo = [field.annotation] if field else []
    while todo:
        kind = todo.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
        todo += typing.get_args(kind)
    return None


def _allowed_keys(parts: tuple[int | str, ...]) -> list[str]:
    """The keys of the section at `parts` (the path of the unknown key, a tag after `model`)."""
    cls: type[BaseModel] | None = Config
    rest = list(parts[:-1])
    while rest and cls is not None:
        part = rest.pop(0)
        if isinstance(part, int):
            continue
        if cls is Config and part == "model":
            cls = ARCHITECTURES.get(str(rest.pop(0)) if rest else "seed_cnn")
        else:
            cls = _section_class(cls, part)
    return sorted(cls.model_fields) if cls else []


def _format_error(where: Where, err: ValidationError) -> str:
    first = err.errors()[0]
    parts = tuple(first["loc"])
    value = first.get("input")
    if first["type"] == "union_tag_invalid" and parts == ("model",):
        name = value.get("name") if isinstance(value, dict) else value
        return (
            f"{where('model.name')}: model.name = {name!r}: unknown model; choose one of "
            f"{sorted(ARCHITECTURES)}"
        )
    # A union (train.devices: int | "auto") adds the branch to the location: not a key.
    shown = tuple(p for p in parts if isinstance(p, int) or "[" not in p)
    if shown[:1] == ("model",) and len(shown) > 1 and shown[1] in ARCHITECTURES:
        shown = shown[:1] + shown[2:]  # the architecture's tag, not a key
    loc = _loc(shown).removesuffix(".constrained-int").removesuffix(".int")
    if first["type"] == "extra_forbidden":
        section = loc.rpartition(".")[0] or "params"
        if loc.startswith("model.") and isinstance(parts[1], str):
            section = f"model (name: {parts[1]})"
        return (
            f"{where(loc)}: unknown key {loc!r} (value {value!r}); {section} takes "
            f"{_allowed_keys(parts)}"
        )
    message = first["msg"].removeprefix("Value error, ")
    found = _LEADING_KEY.match(message)
    if found:  # a check of a whole section leads its message with the key to blame
        return f"{where(found.group(1))}: {message}"
    if not loc:
        return f"{where('')}: params: {message}"
    from cnnops.team import mask

    return f"{where(loc)}: {loc} = {mask(repr(value))}: {message}"


def _params(key: str) -> str:
    return "params"


def _fail(where: Where, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where(key)}: {message}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(paths: Paths, project: Path, where: Where = _params) -> None:
    """Raise ConfigError unless every path is relative and inside `project` (symbolic links
    followed) and the data/output paths are apart: from each other, from paths.src, .git, .dvc
    and the project folder itself, so no stage can replace a folder it does not own."""
    root = project.resolve()
    resolved: dict[str, Path] = {}
    for name in (*DATA_PATHS, "src"):
        key, value = f"paths.{name}", getattr(paths, name)
        shown = f"{key} = {value.as_posix()!r}"
        allowed = f"give a relative path inside {root.as_posix()}, the folder of the params file"
        if value.is_absolute():
            raise _fail(where, key, f"{shown}: an absolute path; {allowed}")
        full = (root / value).resolve()
        outside = not _inside(full, root)
        if name == "src":  # read only: a shared source tree outside the project is fine
            if outside and not full.is_dir():
                raise _fail(where, key, f"{shown}: outside the project and not a folder; {allowed}")
        elif ".." in value.parts:
            raise _fail(where, key, f"{shown}: '..' is not allowed in a data path; {allowed}")
        elif outside:
            raise _fail(
                where, key, f"{shown}: a symbolic link leads outside the project; {allowed}"
            )
        elif full == root:
            raise _fail(where, key, f"{shown}: the project folder itself; {allowed}, e.g. data/x")
        resolved[name] = full
    reserved = {"paths.src": resolved["src"], ".git": root / ".git", ".dvc": root / ".dvc"}
    rule = "data and output paths (raw, prepared, models, reports) must not overlap"
    for i, name in enumerate(DATA_PATHS):
        key, here = f"paths.{name}", resolved[name]
        shown = f"{key} = {getattr(paths, name).as_posix()!r}"
        for other, there in reserved.items():
            if _inside(here, there) or _inside(there, here):
                raise _fail(
                    where,
                    key,
                    f"{shown}: overlaps {other} (one is or holds the other); {rule} "
                    "paths.src, .git or .dvc",
                )
        for name2 in DATA_PATHS[i + 1 :]:
            if not (_inside(here, resolved[name2]) or _inside(resolved[name2], here)):
                continue
            # Lead with the key the user just set, when one of the two came from --set.
            first, second = name, name2
            if where(f"paths.{name2}").startswith("--set") and not where(key).startswith("--set"):
                first, second = name2, name
            a, b = resolved[first], resolved[second]
            relation = "lies inside"
            if a == b:
                relation = "is the same folder as"
            elif _inside(b, a):
                relation = "contains"
            message = (
                f"paths.{first} = {getattr(paths, first).as_posix()!r} {relation} paths.{second} = "
                f"{getattr(paths, second).as_posix()!r}; {rule}: neither equal nor one inside another"
            )
            raise _fail(where, f"paths.{first}", message)


def _lever(config: Config, key: str) -> tuple[BaseModel, str]:
    *sections, leaf = key.split(".")
    node: BaseModel = config
    for section in sections:
        node = getattr(node, section)
    return node, leaf


def check_space(config: Config, where: Where = _params) -> None:
    """Raise ConfigError unless each end of each `tune.space` range (each choice) is a valid
    value of its lever, as the section that holds the lever validates it (levers the model
    does not honour are `check_levers`'s)."""
    for name, choices in config.tune.space:
        if choices is None:
            continue
        key = f"tune.space.{name}"
        if name not in config.model.levers:
            continue  # not tuned for this model; `check_levers` refuses a study asked over it
        section, leaf = _lever(config, LEVERS[name])
        for value in choices:
            try:
                type(section).model_validate({**section.model_dump(), leaf: value})
            except ValidationError as e:
                raise _fail(
                    where,
                    key,
                    f"{key} = {list(choices)}: {value!r} is not a valid {LEVERS[name]} "
                    f"({e.errors()[0]['msg']})",
                ) from None


def check_levers(config: Config) -> None:
    """Raise ConfigError when `tune.space` sets a range for a lever the model does not honour:
    a study over it would only be noise. A default range of such a lever is left out."""
    space = config.tune.space
    for name in sorted(space.model_fields_set - config.model.levers):
        choices = getattr(space, name)
        if choices is not None:
            key = f"tune.space.{name}"
            raise ConfigError(
                f"{key} = {list(choices)}: model {config.model.name!r} has no such lever "
                f"(it honours {sorted(config.model.levers)}); set it null or remove it"
            )


def check_secrets(config: Config, where: Where = _params) -> None:
    """Raise ConfigError when a URL in params carries a password: params are committed, logged
    to MLflow and written to reports. Passwords come from the environment."""
    from cnnops.team import refuse_password

    for key, url in (
        ("mlflow.tracking_uri", config.mlflow.tracking_uri),
        ("tune.storage", config.tune.storage),
    ):
        try:
            refuse_password(key, url)
        except ConfigError as e:
            raise _fail(where, key, str(e)) from None


def check_runtime(config: Config, where: Where = _params) -> None:
    """Raise ConfigError when train.accelerator/devices ask for devices this machine lacks.

    torch is imported only when the answer depends on the hardware (a GPU or MPS accelerator,
    or several devices under auto), so `cnnops show-config` of a CPU config stays quick."""
    t = config.train
    several = isinstance(t.devices, int) and t.devices > 1
    if t.accelerator == "cpu" or (t.accelerator == "auto" and not several):
        return
    import torch

    gpus = torch.cuda.device_count()  # NVML where it can: CUDA itself stays uninitialized
    shown = f"train.accelerator = {t.accelerator!r}"
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        raise _fail(
            where, "train.accelerator", f"{shown}: this machine has no CUDA GPU; use auto or cpu"
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise _fail(where, "train.accelerator", f"{shown}: MPS is not available; use auto or cpu")
    limit, kind = (gpus, "CUDA GPU(s)") if t.accelerator != "mps" else (1, "MPS device")
    if t.accelerator == "auto" and gpus == 0:
        return  # auto is the CPU here: several devices are CPU processes under ddp
    if isinstance(t.devices, int) and t.devices > limit:
        raise _fail(
            where,
            "train.devices",
            f"train.devices = {t.devices}: more than the {limit} {kind} here "
            f"({shown}); use at most {limit}, or auto",
        )


_LEADING_KEY = re.compile(r"^([A-Za-z_][\w.\[\]]*) = ")


def load_config(
    path: Path = Path("params.yaml"),
    overrides: list[str] | None = None,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """Load and validate params.yaml plus `--set` overrides; raise ConfigError naming the key
    and where its value came from (the file, or the `--set` that assigned it). `check` runs
    further checks whose errors lead with a key (the CLI passes the model's shape checks)."""
    overrides = list(overrides or [])
    data = read_params(path)
    for assignment in overrides:
        apply_override(data, assignment)
    where = _where(path, overrides)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(where, e)) from None
    check_paths(config.paths, path.parent, where)
    check_space(config, where)
    check_secrets(config, where)
    try:
        if check is not None:
            check(config)
        if config.augment.transforms:  # only then is Albumentations worth importing
            from cnnops.augment import check_spec

            check_spec(config.augment)
    except ConfigError as e:  # these name the key first: say where its value came from
        found = _LEADING_KEY.match(str(e))
        if found:
            raise ConfigError(f"{where(found.group(1))}: {e}") from None
        raise
    check_runtime(config, where)
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
