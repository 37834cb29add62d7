"""The LightningModule: normalization on device, loss (+L1), optimizer (L2), schedule, metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from cnnops.config import Train, Zoo, parse_model
from cnnops.errors import ConfigError
from cnnops.graphs import CapturedStep, GraphedOptimizer
from cnnops.models import build_model, net_input_size

AUX_WEIGHT = 0.4
"""Weight of an auxiliary classifier's loss (Inception-v3; Szegedy et al., 2016)."""


class Classifier(L.LightningModule):
    """Wraps a registered model; takes uint8 or normalized float images, returns logits."""

    def __init__(
        self,
        model: dict[str, Any],
        train: dict[str, Any],
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: list[float],
        std: list[float],
        classes: list[str],
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Everything needed to rebuild the model (and the resolved config) rides in the checkpoint.
        self.save_hyperparameters()
        self.spec, self.train_spec = parse_model(model), Train(**train)
        # The network's side; batches of another size are resized on the device.
        self.input_size = net_input_size(self.spec, image_size)
        self.net = build_model(self.spec, in_channels, num_classes, self.input_size)
        self.apply_freeze(epoch=0)  # before DDP, which fixes the trained parameters, wraps it
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        # (x / 255 - mean) / std folded into one multiply-add on pixel values.
        self.register_buffer("scale", 1 / (255 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)
        self.gpu_augment: torch.nn.Module | None = None
        self.graph_step: CapturedStep | None = None
        self.graph_optimizer: GraphedOptimizer | None = None
        """Set when the optimizer step is captured with the training step (see
        `train.cuda_graphs_optimizer`); None: the optimizer steps eagerly."""
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.total_steps: int | None = None
        """Optimizer steps the run will take, for a per-step schedule when no trainer counts
        them (trials trained outside Lightning, `cnnops.fused`)."""

    def capture_train_step(self) -> None:
        """Train with the forward and backward pass replayed from a CUDA graph (see
        `cnnops.graphs`). Optimization turns manual: `training_step` drives the optimizer."""
        augment = self.gpu_augment
        t = self.train_spec
        self.graph_step = CapturedStep(
            self._captured_step,
            self,
            generators=getattr(augment, "generators", tuple),
            required=t.cuda_graphs is True or t.cuda_graphs_optimizer is True,
            key="train.cuda_graphs" if t.cuda_graphs is True else "train.cuda_graphs_optimizer",
        )
        self.automatic_optimization = False

    def optimizer_capture_blocker(self) -> str | None:
        """Why this run's optimizer step cannot be captured with its training step (None: it
        can). Needs the trainer: its callbacks and settings decide too."""
        t = self.train_spec
        if self.graph_step is None:
            return (
                "the training step is not captured in this run (train.cuda_graphs is false or "
                "does not apply: no single CUDA device, train.compile, 16-mixed or unfreeze_epoch)"
            )
        if t.scheduler.name == "onecycle":
            return (
                "train.scheduler.name = 'onecycle' changes the momentum every step, which a "
                "captured step cannot follow"
            )
        trainer = self.trainer
        if trainer.gradient_clip_val or trainer.accumulate_grad_batches != 1:
            return "gradient clipping or accumulation acts between backward and the update"
        from lightning.pytorch.callbacks import Callback
        from lightning.pytorch.utilities.model_helpers import is_overridden

        hooked = [
            type(c).__name__
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if is_overridden("on_before_optimizer_step", c, Callback)
        ]
        if is_overridden("on_before_optimizer_step", self, L.LightningModule):
            hooked.append(type(self).__name__)
        if hooked:
            return f"{', '.join(hooked)} inspect(s) gradients before the update"
        return None

    def _graphed_optimizer(self, optimizer: torch.optim.Optimizer) -> GraphedOptimizer | None:
        """`optimizer` prepared to update inside the captured step, when
        `train.cuda_graphs_optimizer` asks for it and it applies; true where it cannot is a
        ConfigError naming the reason."""
        setting = self.train_spec.cuda_graphs_optimizer
        if setting is False:
            return None
        why = self.optimizer_capture_blocker()
        if why is None:
            assert self.graph_step is not None
            self.graph_step.release()  # a graph of an earlier fit holds another optimizer's state
            return GraphedOptimizer(optimizer)
        if setting is True:
            raise ConfigError(f"train.cuda_graphs_optimizer = true: {why}; use auto or false")
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Random states ride in the checkpoint, so a resumed run draws what an uninterrupted
        one would have (dropout, noise, batched augmentation)."""
        checkpoint["cnnops_rng"] = rng_state(self.gpu_augment, cuda=self.graph_step is None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "cnnops_rng" in checkpoint:
            set_rng_state(checkpoint["cnnops_rng"], self.gpu_augment)

    def frozen(self, epoch: int) -> bool:
        """Whether the pretrained backbone is frozen during `epoch` (0-based)."""
        spec = self.spec
        if not isinstance(spec, Zoo) or spec.freeze != "backbone":
            return False
        return spec.unfreeze_epoch is None or epoch < spec.unfreeze_epoch

    def is_head(self, parameter: str) -> bool:
        """Whether a parameter of `net` belongs to the head (all of a network built from params)."""
        if not isinstance(self.spec, Zoo):
            return True
        from cnnops.models.zoo import is_head

        return is_head(self.spec.name, parameter)

    def apply_freeze(self, epoch: int) -> None:
        """Freeze or free the backbone for `epoch`: its parameters take no gradient and its
        batch norm layers keep their ImageNet statistics while frozen."""
        if not isinstance(self.spec, Zoo) or self.spec.freeze != "backbone":
            return
        frozen = self.frozen(epoch)
        for name, p in self.net.named_parameters():
            if not self.is_head(name):
                p.requires_grad_(not frozen)
        for m in self.net.modules():  # the heads are linear layers: every batch norm is backbone
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train(self.training and not frozen)

    def on_train_epoch_start(self) -> None:
        self.apply_freeze(self.current_epoch)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels → standardized floats at the network's size; float input is taken as
        already standardized."""
        if x.dtype == torch.uint8:
            x = self.standardize(x.float())
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
        return x

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixel values in [0, 255] → the network's input scale."""
        return torch.addcmul(self.shift, x, self.scale)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).float().softmax(dim=1)

    @torch.inference_mode()
    def predict_images(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class probabilities (N, K), float32, of uint8 images (N, C, H, W), a batch at a time."""
        chunks = np.split(x, range(batch_size, len(x), batch_size))
        parts = [self.predict_proba(torch.from_numpy(np.ascontiguousarray(c))) for c in chunks]
        return torch.cat(parts).numpy()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training and self.graph_step is not None:
            return x, y  # the captured step augments and normalizes
        return self.prepare_input(x, train=self.trainer.training), y

    def prepare_input(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """A batch as the network takes it: augmented (training, batched engine), normalized,
        channels_last on CUDA."""
        if train and self.gpu_augment is not None and x.dtype == torch.uint8:
            x = self.standardize(self.gpu_augment(x))
        x = self.normalize(x)  # a no-op where augmentation standardized it at the right size
        if x.is_cuda and self.train_spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        """The loss of a batch the network takes (`prepare_input`); its summed loss and hits add
        up in `stage`'s sums on the device."""
        logits, aux = self.net(x), None
        if isinstance(logits, tuple):  # an auxiliary classifier's logits ride along in training
            logits, aux = logits
        smoothing = self.train_spec.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        # Sums stay on the device, added in place, and are read once per epoch: no GPU sync per
        # step, and a captured step keeps adding into the same tensor.
        stats = torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
        sums = self._sums.get(stage)
        if sums is None:
            self._sums[stage] = sums = torch.zeros_like(stats)
        sums.add_(stats)
        if aux is not None:  # trained, not reported: the metrics are the main classifier's
            loss = loss + AUX_WEIGHT * F.cross_entropy(aux, y, label_smoothing=smoothing)
        return loss

    def _count(self, stage: str, n: int) -> None:
        self._counts[stage] = self._counts.get(stage, 0) + n  # known on the host: no copy

    def open_sums(self, *stages: str) -> None:
        """Make `stages`' sums now, zero, on the module's device. A step captured before its
        sums exist would make them inside the graph, and every replay would zero them again."""
        device = next(self.parameters()).device
        for stage in stages:
            self._sums.setdefault(stage, torch.zeros(2, device=device))

    def take_sums(self, stage: str) -> tuple[float, float]:
        """`stage`'s summed loss and hits since the last take, on this rank; the sums are zeroed
        in place (a captured step keeps adding into the same tensor)."""
        sums = self._sums.get(stage)
        if sums is None:
            return 0.0, 0.0
        loss, correct = sums.tolist()
        sums.zero_()
        return loss, correct

    def epoch_metrics(self, stage: str) -> dict[str, float]:
        """Mean loss and accuracy of `stage` since the last call, over all ranks."""
        sums, count = self._sums.get(stage), self._counts.pop(stage, 0)
        if sums is None or count == 0:
            return {}
        total = sums
        if self.trainer.world_size > 1:
            total = torch.cat([sums, sums.new_tensor([count])])
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = int(total[2].item())
        loss, correct = total[:2].tolist()
        sums.zero_()
        return {f"{stage}_loss": loss / count, f"{stage}_acc": correct / count}

    def on_validation_epoch_end(self) -> None:
        # Checkpointing, early stopping and pruning read these from the trainer's metrics.
        self.log_dict(self.epoch_metrics("val"))

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.epoch_metrics("test"))

    def l1_penalty(self) -> torch.Tensor:
        weights = [p for p in self.net.parameters() if p.ndim > 1 and p.requires_grad]
        return torch.stack([w.abs().sum() for w in weights]).sum()

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A training batch's loss: `batch_loss` plus the L1 penalty."""
        loss = self.batch_loss(x, y, "train")
        if self.train_spec.l1 > 0:
            loss = loss + self.train_spec.l1 * self.l1_penalty()
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        x, y = batch
        self._count("train", len(y))
        if self.graph_step is None:
            return self.train_loss(x, y)
        graph_step = self.graph_step
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        if self.graph_optimizer is not None:
            self.graph_optimizer.sync()  # the rates the schedule set, into the graph's tensors
        # With a graphed optimizer the closure also updates (in the graph) and step() only runs
        # it; Lightning counts the step and runs its optimizer hooks either way.
        optimizer.step(closure=lambda: graph_step(x, y))
        # Manual optimization steps the schedule itself, where Lightning would: after each
        # step, or after an epoch's last one (before the epoch-end hooks read the rate).
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step" or self.trainer.is_last_batch:
                config.scheduler.step()  # type: ignore[call-arg]
        return None

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before validating; a captured step owns its gradient
        # tensors (the graph writes them), so they stay, zeroed.
        if self.graph_step is None:
            super().on_validation_model_zero_grad()
        else:
            self.zero_grad(set_to_none=False)

    def _captured_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What `graph_step` captures: forward and backward, and the update when the optimizer
        step is captured too."""
        loss = self._forward_backward(x, y)
        if self.graph_optimizer is not None:
            self.graph_optimizer.update()
        return loss

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The captured part of a training step: uint8 batch in, gradients and loss out."""
        # Capture needs autocast's weight-cast cache off; keep whatever precision is in force.
        with torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,
        ):
            loss = self.train_loss(self.prepare_input(x, train=True), y)
        loss.backward()
        return loss.detach()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._count("val", len(y))
        self.batch_loss(x, y, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._count("test", len(y))
        self.batch_loss(x, y, "test")

    def configure_optimizers(self) -> Any:
        opt, sched = self.train_spec.optimizer, self.train_spec.scheduler
        # L2 acts on weights only: decaying biases and batch-norm scales fights normalization.
        # A pretrained backbone learns at lr * backbone_lr_mult; the head (first: the lr logged)
        # at lr. Frozen parameters are in their groups too: they get no gradient until freed.
        world = self._trainer.world_size if self._trainer is not None else 1  # built alone: 1
        base_lr = opt.lr * lr_scale(opt.lr_scaling, world)
        groups = []
        for head in (True, False):
            params = [p for n, p in self.net.named_parameters() if self.is_head(n) == head]
            lr = base_lr if head else base_lr * opt.backbone_lr_mult
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim > 1) == decay]
                wd = opt.weight_decay if decay else 0.0
                if chosen:
                    groups.append({"params": chosen, "weight_decay": wd, "lr": lr})
        # One fused kernel per step instead of one per tensor group: small models are launch-bound.
        fused = True if self.device.type == "cuda" else None
        if opt.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=base_lr, momentum=opt.momentum, nesterov=opt.momentum > 0
            )
        elif opt.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=base_lr, fused=fused)
        else:
            optimizer = torch.optim.AdamW(groups, lr=base_lr, fused=fused)
        # Before the scheduler: it wraps the optimizer's step, which this replaces.
        self.graph_optimizer = self._graphed_optimizer(optimizer)
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return optimizer
        interval = "step" if sched.name == "onecycle" else "epoch"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        sched, epochs = self.train_spec.scheduler, self.train_spec.max_epochs
        if sched.name == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, sched.step_size, sched.gamma)
        if sched.name == "onecycle":
            steps = self.total_steps or int(self.trainer.estimated_stepping_batches)
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=max(steps, 1),
            )
        if sched.name == "cosine":
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(epochs - sched.warmup_epochs, 1)
            )
            if sched.warmup_epochs == 0:
                return cosine
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, sched.warmup_epochs)
            return torch.optim.lr_scheduler.SequentialLR(
                optimizer, [warmup, cosine], [sched.warmup_epochs]
            )
        return None


def lr_scale(rule: str, world_size: int) -> float:
    """train.optimizer.lr_scaling: the factor on lr for a global batch of `world_size` devices."""
    return {"none": 1.0, "sqrt": world_size**0.5, "linear": float(world_size)}[rule]


def rng_state(augment: torch.nn.Module | None, cuda: bool = True) -> dict[str, Any]:
    """Every random state training draws from, in types a `weights_only` load accepts."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generators = getattr(augment, "generators", None)
    if generators is not None:
        state["augment"] = [g.get_state() for g in generators()]
    return state


def set_rng_state(state: dict[str, Any], augment: torch.nn.Module | None) -> None:
    import random

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("augment") or []
    if augment is not None and saved:
        augment.restore_generators(saved)  # type: ignore[operator]
