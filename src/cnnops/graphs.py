"""One training step's forward and backward pass, captured once as a CUDA graph and replayed.

A small network on a fast GPU spends most of a step launching kernels from Python: the GPU work
of the MNIST seed CNN at batch 512 is a fraction of a millisecond, the launches take several.
Replaying a captured graph launches the whole augment → normalize → forward → loss → backward
sequence at once. The optimizer step stays eager (one fused kernel), so learning-rate schedules,
Lightning's optimizer hooks and checkpoints see an ordinary optimizer.

What the captured function may do is what CUDA graphs allow: no host synchronization, the same
shapes on every call, random numbers from the default generator or from `generators` (which are
registered with the graph, so every replay draws fresh numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

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
    ) -> None:
        self.fn, self.module, self.warmup, self.generators = fn, module, warmup, generators
        self.required = required
        self.failed: str | None = None
        """Why capture failed; the step then runs eagerly (unless `required`: then it raises)."""
        self.calls = self.recaptures = 0
        self.grads: list[torch.Tensor | None] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failed is not None:
            self._clear_grads()
            return self.fn(x, y)
        if self.graph is not None and self.static is not None and self.loss is not None:
            sx, sy = self.static
            if x.shape != sx.shape or y.shape != sy.shape:
                for p in self.module.parameters():  # eager into the graph's gradient tensors
                    if p.grad is not None:
                        p.grad.zero_()
                return self.fn(x, y)
            if self._grads_intact():
                sx.copy_(x)
                sy.copy_(y)
                self.graph.replay()
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
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures.
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.loss = self.fn(*self.static)
        except RuntimeError as e:
            # A step that syncs with the host (.item(), data-dependent shapes) cannot be captured.
            self.failed = (str(e).splitlines() or [type(e).__name__])[0]
            if self.required:
                raise ConfigError(
                    f"train.cuda_graphs = true: the step cannot be captured ({self.failed}); "
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
        self.grads = [p.grad for p in self.module.parameters()]
        graph.replay()  # capturing records the work without running it
        return self.loss

    def _release_generators(self) -> None:
        """A capture that fails midway leaves its generators marked as capturing, so the next
        eager random draw (a dropout) would fail; each continues from a clone of its state."""
        default = torch.cuda.default_generators[torch.cuda.current_device()]
        for generator in (default, *self.generators()):
            generator.graphsafe_set_state(generator.clone_state())

    def _grads_intact(self) -> bool:
        return all(p.grad is g for p, g in zip(self.module.parameters(), self.grads, strict=True))

    def _clear_grads(self) -> None:
        # Before capture each step allocates fresh gradients: the captured backward must own them.
        for p in self.module.parameters():
            p.grad = None
