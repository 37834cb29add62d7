"""`GraphedOptimizer` outside a graph (on any device): its update is torch's update with the
learning rate read from a tensor the schedule's value is copied into, and it leaves the
optimizer as checkpoints and schedulers see it. Captured on a GPU: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from cnnops.graphs import GraphedOptimizer


def twins(name: str) -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))]
    models.append(
        type(models[0])(*(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)))
    )
    models[1].load_state_dict(models[0].state_dict())

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
        ]
        if name == "sgd":
            return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return kind(groups, lr=3e-3, fused=True)

    return models, [make(m) for m in models]


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_update_follows_the_schedule_as_torch_s_step_does(name: str) -> None:
    (reference, model), (plain, optimizer) = twins(name)
    graphed = GraphedOptimizer(optimizer)
    schedules = [
        torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (plain, optimizer)
    ]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(7):
        plain.zero_grad(set_to_none=True)
        loss_of(reference, x, y)
        plain.step()
        optimizer.zero_grad(set_to_none=True)
        graphed.sync()
        # What Lightning calls: step(closure) runs the closure, which updates.
        optimizer.step(closure=lambda: (loss_of(model, x, y), graphed.update())[0])
        for schedule in schedules:
            schedule.step()
        for a, b in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert [float(t) for t in graphed.lrs] == pytest.approx([0.125 * plain.defaults["lr"]] * 2)
    # Checkpoints and schedulers see the optimizer eager training has: float rates, its flags.
    assert optimizer.state_dict()["param_groups"] == plain.state_dict()["param_groups"]
    assert all(type(g["lr"]) is float for g in optimizer.param_groups)
    assert schedules[1].state_dict() == schedules[0].state_dict()


def test_step_only_runs_its_closure_the_update_is_the_graph_s() -> None:
    (_, model), (_, optimizer) = twins("adamw")
    GraphedOptimizer(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    loss = optimizer.step(closure=lambda: loss_of(model, x, y))
    assert loss is not None and all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="updates inside the captured training step"):
        optimizer.step()


def test_a_hyperparameter_changed_after_capture_is_refused() -> None:
    (_, _), (_, optimizer) = twins("adamw")
    graphed = GraphedOptimizer(optimizer)
    graphed.baked = graphed.hyperparameters()  # as capturing the update records them
    optimizer.param_groups[0]["lr"] = 1e-4  # the rate reaches the graph: fine
    graphed.sync()
    assert float(graphed.lrs[0]) == pytest.approx(1e-4)
    optimizer.param_groups[0]["betas"] = (0.85, 0.999)  # what OneCycleLR's momentum cycling does
    with pytest.raises(RuntimeError, match="other than the learning rate changed"):
        graphed.sync()


def test_only_optimizers_with_a_capturable_fused_update_are_taken() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="RMSprop: no capturable fused update"):
        GraphedOptimizer(torch.optim.RMSprop(model.parameters()))
