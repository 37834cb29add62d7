"""On a real GPU: the fast path (resident data, batched augmentation) against the Albumentations path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cnnops.checkpoints import load_classifier
from cnnops.config import Config, load_config
from cnnops.data import prepare
from cnnops.data.sources import fetch
from cnnops.evaluate import score
from cnnops.train import train
from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TRANSLATE = (
    "augment.transforms=[{name: affine, p: 1.0, params: {rotate: 0, scale: 0, translate: 0.08}}]"
)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> prepare.Prepared:
    config = load_config(ROOT / "pipelines/mnist/params.yaml", [f"fetch.mirror={mnist_mirror}"])
    raw = tmp_path_factory.mktemp("raw")
    fetch(config.fetch, raw)
    return prepare.split(config, raw)


def translating(epochs: int, *overrides: str) -> Config:
    """The MNIST config at batch 512, bf16, random translate, `epochs` without early stopping."""
    common = [
        f"train.max_epochs={epochs}",
        "train.batch_size=512",
        "train.precision=bf16-mixed",
        "train.early_stopping.enabled=false",
        TRANSLATE,
    ]
    return load_config(ROOT / "pipelines/mnist/params.yaml", [*common, *overrides])


def accuracy(config, data: prepare.Prepared, out: Path) -> float:
    result = train(config, data, out)
    proba = load_classifier(result.best_checkpoint).eval().predict_images(data.x["test"])
    return score(proba, data.y["test"], data.classes)["test_acc"]


def test_fast_path_and_albumentations_path_reach_the_same_accuracy(mnist, tmp_path: Path) -> None:
    fast = translating(5, "augment.engine=batched")
    workers = translating(5, "augment.engine=albumentations", "train.num_workers=8")
    fast_acc = accuracy(fast, mnist, tmp_path / "fast")
    workers_acc = accuracy(workers, mnist, tmp_path / "workers")
    print(f"fast path {fast_acc:.4f}, albumentations path {workers_acc:.4f}")
    assert fast_acc >= 0.99 and workers_acc >= 0.99
    assert abs(fast_acc - workers_acc) <= 0.002


def test_the_fast_path_keeps_the_data_on_the_gpu(mnist, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    seen = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen["device"], seen["dtype"] = batch[0].device.type, batch[0].dtype
            seen["augment"] = module.gpu_augment is not None

    config = load_config(ROOT / "pipelines/mnist/params.yaml", ["train.max_epochs=1", TRANSLATE])
    train(config, mnist, tmp_path, callbacks=[Spy()])
    # uint8 on the device: the captured step augments and normalizes inside its graph.
    assert seen == {"device": "cuda", "dtype": torch.uint8, "augment": True}
    eager = load_config(
        ROOT / "pipelines/mnist/params.yaml",
        ["train.max_epochs=1", "train.cuda_graphs=false", TRANSLATE],
    )
    train(eager, mnist, tmp_path / "eager", callbacks=[Spy()])
    assert seen == {"device": "cuda", "dtype": torch.float32, "augment": True}


def subset(data: prepare.Prepared, n: int) -> prepare.Prepared:
    x = {**data.x, "train": data.x["train"][:n], "val": data.x["val"][:1000]}
    y = {**data.y, "train": data.y["train"][:n], "val": data.y["val"][:1000]}
    return prepare.Prepared(x, y, data.classes, data.mean, data.std)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_captured_steps_train_as_eager_steps_do(mnist, tmp_path: Path, schedule: str) -> None:
    # No randomness inside the step (no dropout, noise or augmentation) and deterministic
    # kernels: replaying the graph must give the eager run's weights, step for step, including
    # the eager partial last batch (2100 = 8 x 256 + 52) and the learning-rate schedule.
    data = subset(mnist, 2100)
    common = [
        "train.max_epochs=3",
        "train.batch_size=256",
        "train.deterministic=true",
        "train.early_stopping.enabled=false",
        "model.dropout_fc=0.0",
        f"train.scheduler.name={schedule}",
    ]
    from lightning.pytorch.callbacks import Callback

    class Spy(Callback):
        def on_train_end(self, trainer, module) -> None:
            step = module.graph_step
            seen[graphs] = None if step is None else (step.captured, step.recaptures)

    seen: dict[str, tuple[bool, int] | None] = {}
    params = ROOT / "pipelines/mnist/params.yaml"
    runs = {}
    for graphs in ("false", "true"):
        config = load_config(params, [*common, f"train.cuda_graphs={graphs}"])
        result = train(config, data, tmp_path / graphs, callbacks=[Spy()])
        state = torch.load(result.last_checkpoint, weights_only=True)
        runs[graphs] = (result, state)
    assert seen == {"false": None, "true": (True, 0)}  # validation keeps the graph's gradients
    (eager, eager_state), (graphed, graphed_state) = runs["false"], runs["true"]
    assert (eager.metrics["cuda_graphs"], graphed.metrics["cuda_graphs"]) == (False, True)
    assert graphed_state["global_step"] == eager_state["global_step"] == 3 * 9
    for key, value in eager_state["state_dict"].items():
        torch.testing.assert_close(graphed_state["state_dict"][key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.curves, graphed.curves, strict=True):
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == b["val_acc"]


def test_graphed_training_keeps_the_eager_accuracy(mnist, tmp_path: Path) -> None:
    graphed = accuracy(translating(4), mnist, tmp_path / "graphed")
    eager = accuracy(translating(4, "train.cuda_graphs=false"), mnist, tmp_path / "eager")
    print(f"graphed {graphed:.4f}, eager {eager:.4f}")
    assert graphed >= 0.99 and abs(graphed - eager) <= 0.002


class Twins:
    """Two identical linear models and SGD optimizers: one stepped eagerly as the reference,
    the other through a `CapturedStep`; `step()` checks their weights agree after each step."""

    def __init__(self, host_sync: bool = False) -> None:
        torch.manual_seed(0)
        self.x = torch.randn(64, 8, device="cuda")
        self.y = torch.randint(0, 3, (64,), device="cuda")
        self.models = [torch.nn.Linear(8, 3).cuda() for _ in range(2)]
        self.models[1].load_state_dict(self.models[0].state_dict())
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in self.models]
        self.host_sync = host_sync

    def fn(self, model: torch.nn.Module):
        def forward_backward(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            if not self.host_sync or loss.item() > 0:  # .item(): a host sync, not capturable
                loss.backward()
            return loss.detach()

        return forward_backward

    def captured(self, **options):
        from cnnops.graphs import CapturedStep

        return CapturedStep(self.fn(self.models[1]), self.models[1], **options)

    def step(self, captured) -> None:
        reference, optimizers = self.models[0], self.optimizers
        optimizers[0].zero_grad(set_to_none=True)
        self.fn(reference)(self.x, self.y)
        optimizers[0].step()
        captured(self.x, self.y)
        optimizers[1].step()
        for a, b in zip(reference.parameters(), self.models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_a_captured_step_recaptures_when_its_gradients_are_released() -> None:
    twins = Twins()
    captured = twins.captured(warmup=2)
    for i in range(8):
        if i == 5:  # what Lightning does before validating
            twins.optimizers[1].zero_grad(set_to_none=True)
        twins.step(captured)
    assert captured.captured and captured.recaptures == 1


def test_a_step_that_cannot_be_captured_trains_eagerly_or_fails_when_graphs_are_required() -> None:
    from cnnops.errors import ConfigError

    twins = Twins(host_sync=True)
    required = twins.captured(warmup=1, required=True)
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs = true: .*cannot be captured"):
        for _ in range(2):
            required(twins.x, twins.y)
    twins.models[1].load_state_dict(twins.models[0].state_dict())
    captured = twins.captured(warmup=1)
    with pytest.warns(UserWarning, match="capture failed, training eagerly"):
        for _ in range(4):
            twins.step(captured)
    assert not captured.captured and captured.failed
    # Random draws go on after the failed capture, at the generator's position: a dropout
    # draws, and the draw after it is the one a fresh generator would make at that offset.
    state = torch.cuda.get_rng_state()
    first = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(first, torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> prepare.Prepared:
    """1000 photo-like 96 px images (digits on random colours), split as the transfer variant."""
    from cnnops.data.demo import colour_digits

    folder = tmp_path_factory.mktemp("photos")
    colour_digits(folder / "images", 1000, side=96)
    config = load_config(
        ROOT / "pipelines/transfer/params.yaml", [f"fetch.url={folder / 'images'}"]
    )
    raw = tmp_path_factory.mktemp("raw")
    fetch(config.fetch, raw)
    return prepare.split(config, raw)


def test_a_frozen_pretrained_backbone_trains_its_head_in_captured_steps(
    photos, tmp_path: Path, mobilenet_weights: Path
) -> None:
    """MobileNetV2 from the ImageNet file, backbone frozen throughout, bf16, channels_last,
    CUDA graphs on: the head learns, the backbone stays the file's, batch norm included."""
    config = load_config(
        ROOT / "pipelines/transfer/params.yaml",
        [
            f"model.weights={mobilenet_weights}",
            "model.unfreeze_epoch=null",
            "train.max_epochs=4",
            "train.precision=bf16-mixed",
            "train.early_stopping.enabled=false",
        ],
    )
    result = train(config, photos, tmp_path)
    assert result.metrics["cuda_graphs"] is True
    assert result.metrics["best_val_acc"] >= 0.3  # chance is 0.1
    trained = load_classifier(result.best_checkpoint).net.state_dict()
    imagenet = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    for key, value in imagenet.items():
        if not key.startswith("classifier."):
            assert torch.equal(trained[key].float(), value.float()), key


# --- the optimizer step inside the captured graph (train.cuda_graphs_optimizer) -------------------

STEPS = 4 * 9  # 4 epochs of 2100 images at batch 256: 8 full batches and an eager partial one


def exact(*overrides: str) -> Config:
    """fp32, deterministic kernels, no randomness in the step: eager and captured steps must
    give the same weights; `overrides` pick the optimizer, schedule and graph settings."""
    common = [
        "train.max_epochs=4",
        "train.batch_size=256",
        "train.precision='32'",  # the string: a bare 32 is a YAML number
        "train.deterministic=true",
        "train.early_stopping.enabled=false",
        "model.dropout_fc=0.0",
    ]
    return load_config(ROOT / "pipelines/mnist/params.yaml", [*common, *overrides])


class Trace(Callback):
    """Records, after every training step, the whole module state (weights and batch-norm
    statistics, flattened), the learning rate and the global step; at the end, how the steps
    ran."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.global_steps: list[int] = []
        self.ran: dict[str, object] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        state = module.state_dict()
        self.states.append(torch.cat([v.detach().float().flatten() for v in state.values()]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.global_steps.append(trainer.global_step)

    def on_train_end(self, trainer, module) -> None:
        step = module.graph_step
        self.ran = {
            "captured": step is not None and step.captured,
            "replays": None if step is None else step.replays,
            "recaptures": None if step is None else step.recaptures,
            "optimizer_in_graph": module.graph_optimizer is not None,
        }


def run_traced(config: Config, data: prepare.Prepared, out: Path, **kwargs):
    trace = Trace()
    result = train(config, data, out, callbacks=[trace], **kwargs)
    return result, trace, torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict, rtol: float, atol: float) -> None:
    """Two checkpoints' global step, schedule and optimizer settings equal; weights and
    optimizer state equal within (rtol, atol), the per-parameter step counters exactly."""
    assert a["global_step"] == b["global_step"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # float rates, capturable as eager
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            other = opt_b["state"][index][key]
            if key == "step":
                assert value.device == other.device and torch.equal(value, other), (index, key)
            else:
                torch.testing.assert_close(other, value, rtol=rtol, atol=atol)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=rtol, atol=atol)


SCHEDULES = {
    # Warm-up then cosine: a new rate every epoch (SequentialLR of LinearLR and cosine).
    "adamw": ["train.scheduler.name=cosine", "train.scheduler.warmup_epochs=1"],
    "sgd": [
        "train.scheduler.name=step",
        "train.scheduler.step_size=1",
        "train.scheduler.gamma=0.5",
    ],
}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_captured_optimizer_step_trains_as_the_eager_step_does(
    mnist, tmp_path: Path, optimizer: str
) -> None:
    data = subset(mnist, 2100)
    settings = [f"train.optimizer.name={optimizer}", *SCHEDULES[optimizer]]
    eager_result, eager, eager_ckpt = run_traced(
        exact(*settings, "train.cuda_graphs=false"), data, tmp_path / "eager"
    )
    result, captured, ckpt = run_traced(
        exact(*settings, "train.cuda_graphs_optimizer=true"), data, tmp_path / "captured"
    )
    # Every full batch after the three warm-up steps was one replay, the update included.
    assert captured.ran == {
        "captured": True,
        "replays": STEPS - 4 - 3,
        "recaptures": 0,
        "optimizer_in_graph": True,
    }
    assert eager.ran["optimizer_in_graph"] is False
    assert (
        eager_result.metrics["cuda_graphs_optimizer"],
        result.metrics["cuda_graphs_optimizer"],
    ) == (
        False,
        True,
    )
    assert len(eager.states) == len(captured.states) == STEPS
    assert captured.global_steps == eager.global_steps == list(range(1, STEPS + 1))
    assert captured.lrs == eager.lrs and len(set(eager.lrs)) >= 4  # a new rate each epoch
    worst = 0.0
    for step, (a, b) in enumerate(zip(eager.states, captured.states, strict=True)):
        worst = max(worst, float((a - b).abs().max()))
        torch.testing.assert_close(
            b, a, rtol=1e-5, atol=1e-6, msg=lambda m, s=step: f"step {s}: {m}"
        )
    print(f"{optimizer}: largest weight difference over {STEPS} steps {worst:.3g}")
    assert ckpt["global_step"] == eager_ckpt["global_step"] == STEPS
    assert_same_training_state(eager_ckpt, ckpt, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_result.curves, result.curves, strict=True):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == b["val_acc"]


def test_a_run_with_a_captured_optimizer_resumes_exactly(mnist, tmp_path: Path) -> None:
    """Stopped after 2 of 4 epochs and resumed from last.ckpt in a new Trainer: the update's
    state (moments, the step counters on the device, the schedule) carries over, and the end
    is the uninterrupted run's."""

    class StopAfter(Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    data = subset(mnist, 2100)
    config = exact(
        "train.optimizer.name=adamw", *SCHEDULES["adamw"], "train.cuda_graphs_optimizer=true"
    )
    _, whole, whole_ckpt = run_traced(config, data, tmp_path / "whole")
    first = train(config, data, tmp_path / "first", callbacks=[StopAfter()])
    halfway = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)
    assert halfway["global_step"] == STEPS // 2
    steps = [s["step"] for s in halfway["optimizer_states"][0]["state"].values()]
    assert all(s.dtype == torch.float32 and float(s) == STEPS // 2 for s in steps)
    result, resumed, ckpt = run_traced(
        config, data, tmp_path / "resumed", resume=first.last_checkpoint
    )
    # The resumed half warms up, captures and replays as the first half did.
    assert resumed.ran == {
        "captured": True,
        "replays": STEPS // 2 - 2 - 3,
        "recaptures": 0,
        "optimizer_in_graph": True,
    }
    assert resumed.global_steps == whole.global_steps[STEPS // 2 :]
    assert resumed.lrs == whole.lrs[STEPS // 2 :]
    for a, b in zip(whole.states[STEPS // 2 :], resumed.states, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert_same_training_state(whole_ckpt, ckpt, rtol=1e-6, atol=1e-7)
    assert len(result.curves) == 4


def test_the_optimizer_step_stays_eager_where_a_graph_cannot_follow_it(
    mnist, tmp_path: Path
) -> None:
    from cnnops.errors import ConfigError

    class GradientNorm(Callback):  # reads gradients between backward and the update
        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            self.norm = torch.stack([p.grad.norm() for p in module.parameters()]).norm()

    data = subset(mnist, 2100)
    one = ["train.max_epochs=1", "train.cuda_graphs_optimizer=auto"]
    # onecycle cycles Adam's beta1 every step; a graph would keep the first value.
    _, trace, _ = run_traced(exact(*one, "train.scheduler.name=onecycle"), data, tmp_path / "a")
    assert trace.ran["captured"] and not trace.ran["optimizer_in_graph"]
    trace = Trace()
    config = exact(*one, "train.scheduler.name=cosine")
    train(config, data, tmp_path / "b", callbacks=[trace, GradientNorm()])
    assert trace.ran["captured"] and not trace.ran["optimizer_in_graph"]
    insist = exact(
        "train.max_epochs=1", "train.cuda_graphs_optimizer=true", "train.scheduler.name=cosine"
    )
    with pytest.raises(ConfigError, match=r"cuda_graphs_optimizer = true: GradientNorm inspect"):
        train(insist, data, tmp_path / "c", callbacks=[GradientNorm()])
