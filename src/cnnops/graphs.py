"""One training step's forward and backward pass, captured once as a CUDA graph and replayed.

A small network on a fast GPU spends most of a step launching kernels from Python: the GPU work
of the MNIST seed CNN at batch 512 is a fraction of a millisecond, the launches take several.
Replaying a captured graph launches the whole augment → normalize → forward → loss → backward
sequence at once. The optimizer step stays eager (one fused kernel), so learning-rate schedules,
Lightning's optimizer hooks and checkpoints see an ordinary optimizer; or, with a
`GraphedOptimizer`, its update is captured too and a step is one replay.

What the captured function may do is what CUDA graphs allow: no host synchronization, the same
shapes on every call, random numbers from the default generator or from `generators` (which are
registered with the graph, so every replay draws fresh numbers).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch

from cnnops.errors import ConfigError

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CapturedStep:
    """Calls `fn(x, y)` (which runs backward and returns the detached loss) eagerly for `warmup`
    calls, then captures it and replays the graph for every batch of the captured shape.

    Gradients: the captured backward writes the parameters' `.grad` tensors in place on every
    replay (they are the graph's own). Whoever sets them to None costs a new capture (counted in
    `recaptures`); a batch of another shape (a partial last batch) runs eagerly into them.
    """

    def __init__(
        self,
        fn: StepFn,
        module: torch.nn.Module,
        warmup: int = 3,
        generators: Callable[[], Sequence[torch.Generator]] = tuple,
        required: bool = False,
        key: str = "train.cuda_graphs",
        pool: Any = None,
    ) -> None:
        self.fn, self.module, self.warmup, self.generators = fn, module, warmup, generators
        self.required, self.key = required, key
        self.pool = pool
        """The memory pool the graph is captured into (`torch.cuda.graph_pool_handle()`), shared
        with the graphs captured before it; None: a pool of its own."""
        self.failed: str | None = None
        """Why capture failed; the step then runs eagerly (unless `required`: then it raises,
        naming the setting `key` that required it)."""
        self.calls = self.recaptures = self.replays = 0
        self.params: list[torch.nn.Parameter] = []
        self.grads: list[torch.Tensor | None] = []
        """The module's parameters at capture and the gradient tensors the graph writes: listed
        once, as walking the module tree before every replay costs more than the check."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def release(self) -> None:
        """Drop the graph: the next calls warm up and capture again (a new optimizer's state)."""
        self.graph = self.static = self.loss = None
        self.params, self.grads = [], []
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failed is not None:
            self._clear_grads()
            return self.fn(x, y)
        if self.graph is not None and self.static is not None and self.loss is not None:
            sx, sy = self.static
            if x.shape != sx.shape or y.shape != sy.shape:
                for p in self.params:  # eager into the graph's gradient tensors
                    if p.grad is not None:
                        p.grad.zero_()
                return self.fn(x, y)
            if self._grads_intact():
                sx.copy_(x)
                sy.copy_(y)
                self.graph.replay()
                self.replays += 1
                return self.loss
            # Something released the gradients (zero_grad(set_to_none=True)): the optimizer
            # would no longer see what the graph writes. Capture again around new ones.
            self.recaptures += 1
        self._clear_grads()
        if self.graph is None and self.calls <= self.warmup:
            # Warm-up on a side stream, as capture will be: autograd and cuDNN set up their
            # per-stream state here rather than inside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.fn(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        return self._capture(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.static = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators():
            graph.register_generator_state(generator)
        try:
            with _capturing(graph, self.pool):
                self.loss = self.fn(*self.static)
        except RuntimeError as e:
            # A step that syncs with the host (.item(), data-dependent shapes) cannot be captured.
            self.failed = (str(e).splitlines() or [type(e).__name__])[0]
            if self.required:
                raise ConfigError(
                    f"{self.key} = true: the step cannot be captured ({self.failed}); "
                    "use auto or false"
                ) from e
            warnings.warn(
                f"CUDA graph capture failed, training eagerly: {self.failed}", stacklevel=2
            )
            self.static = self.loss = None
            self._release_generators()
            self._clear_grads()
            return self.fn(x, y)
        self.graph = graph
        self.params = list(self.module.parameters())
        self.grads = [p.grad for p in self.params]
        graph.replay()  # capturing records the work without running it
        self.replays += 1
        return self.loss

    def _release_generators(self) -> None:
        """A capture that fails midway leaves its generators marked as capturing, so the next
        eager random draw (a dropout) would fail; each continues from a clone of its state."""
        default = torch.cuda.default_generators[torch.cuda.current_device()]
        for generator in (default, *self.generators()):
            generator.graphsafe_set_state(generator.clone_state())

    def _grads_intact(self) -> bool:
        return all(p.grad is g for p, g in zip(self.params, self.grads, strict=True))

    def _clear_grads(self) -> None:
        # Before capture each step allocates fresh gradients: the captured backward must own them.
        for p in self.module.parameters():
            p.grad = None


_capture_stream: torch.cuda.Stream | None = None


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, pool: Any = None) -> Iterator[None]:
    """Capture into `graph` what the body issues, as `torch.cuda.graph` does but without its
    device-wide synchronize and cache flush first: the capture stream waits for the current one
    instead, and the current one for the capture after. A study recaptures its trials' step
    every time a trial joins, and a synchronize there drains the queued epoch.

    thread_local: other threads (a DataLoader's pin-memory thread) may call CUDA while this one
    captures. If the body raises, the capture is ended and its error
    (an invalidated capture) dropped: the body's error is the one to see."""
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    current, side = torch.cuda.current_stream(), _capture_stream
    side.wait_stream(current)
    with torch.cuda.stream(side):
        graph.capture_begin(pool, capture_error_mode="thread_local")
        try:
            yield
        except BaseException:
            with suppress(RuntimeError):
                graph.capture_end()
            raise
        graph.capture_end()
    current.wait_stream(side)


class GraphedOptimizer:
    """`optimizer`'s update, made to run inside a `CapturedStep`: the captured function ends with
    `update()`, and a training step is one replay, the optimizer's kernels included.

    - Learning rates: each param group keeps its float `lr`, so schedulers, checkpoints and logs
      see what eager training shows them. The update reads the rate from a device tensor per
      group instead, which `sync()` (called before every step, outside the graph) refills
      whenever the group's rate changed: what a scheduler sets reaches every replay.
    - The other hyperparameters (betas, momentum, weight decay) are baked into the graph when it
      is captured; `sync()` raises if one changes afterwards (OneCycleLR's momentum cycling)
      rather than train with a stale value.
    - The update itself is torch's fused kernel (Adam, AdamW, SGD), which reads a tensor rate
      and the per-parameter `step` counters on the device: no host synchronization.
    - `optimizer.step(closure)`, which Lightning calls, only runs the closure (the captured
      step, which updates). Its optimizer hooks still run around it; `on_before_optimizer_step`
      then sees the gradients after the update, which is why the caller keeps the update eager
      when anything overrides that hook.
    """

    SUPPORTED = (torch.optim.Adam, torch.optim.SGD)  # AdamW is an Adam
    _RUNTIME_KEYS = frozenset({"lr", "foreach", "fused", "capturable", "differentiable"})

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, self.SUPPORTED):
            raise TypeError(f"{type(optimizer).__name__}: no capturable fused update")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.device = device = groups[0]["params"][0].device
        self.rates = [float(g["lr"]) for g in groups]
        self.lrs = [torch.tensor(r, dtype=torch.float32, device=device) for r in self.rates]
        self._keys = sorted(set(optimizer.defaults) - self._RUNTIME_KEYS)
        self.baked: list[dict[str, Any]] | None = None
        """The hyperparameters the captured update was recorded with (None before capture)."""
        # An instance attribute, set before any scheduler wraps `step` (as schedulers do).
        optimizer.step = types.MethodType(_run_closure, optimizer)  # type: ignore[method-assign]

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: g[k] for k in self._keys if k in g} for g in self.optimizer.param_groups]

    def sync(self) -> None:
        """Bring the update's learning-rate tensors up to the groups' rates (before a step)."""
        for i, group in enumerate(self.optimizer.param_groups):
            rate = group["lr"]
            if rate != self.rates[i]:
                self.lrs[i].fill_(rate)
                self.rates[i] = float(rate)
        if self.baked is not None and self.hyperparameters() != self.baked:
            raise RuntimeError(
                "an optimizer hyperparameter other than the learning rate changed after the "
                f"optimizer step was captured ({self.baked} -> {self.hyperparameters()}); "
                "keep the optimizer step eager for this schedule"
            )

    def update(self) -> None:
        """The optimizer's update, eager or being captured: the fused kernel with tensor rates."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        changes: dict[str, Any] = {"fused": True}
        if capturing and isinstance(self.optimizer, torch.optim.Adam):
            changes["capturable"] = True  # Adam refuses capture otherwise; fused ignores it
        groups = self.optimizer.param_groups
        saved = [{k: g[k] for k in (*changes, "lr") if k in g} for g in groups]
        try:
            for group, lr in zip(groups, self.lrs, strict=True):
                group.update(changes, lr=lr)
            # The class's step: the instance's is `_run_closure` (wrapped by any scheduler).
            type(self.optimizer).step(self.optimizer)  # type: ignore[arg-type]
        finally:
            for group, before in zip(groups, saved, strict=True):
                for k in (*changes, "lr"):
                    if k in before:
                        group[k] = before[k]
                    else:
                        del group[k]
        if capturing:
            self.baked = self.hyperparameters()


def _run_closure(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """`step` of an optimizer whose update runs inside the captured training step: the closure."""
    if closure is None:
        raise RuntimeError(
            f"this {type(optimizer).__name__} updates inside the captured training step; "
            "step() takes the closure that runs it"
        )
    with torch.enable_grad():
        return closure()
