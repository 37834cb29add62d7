"""One contract for every architecture (the timm way), and pretrained weights from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from cnnops.config import ARCHITECTURES, SeedCnn, parse_model
from cnnops.errors import DataError
from cnnops.export import max_abs_diff, to_onnx
from cnnops.models import ZOO
from cnnops.models.zoo import LAYOUTS, load_pretrained, torchvision_net
from cnnops.module import Classifier

SIZES = (28, 32, 96)
CLASSES = 7
TRAIN = {"cuda_graphs": False, "channels_last": False, "max_epochs": 2}


def smallest(name: str) -> int:
    return ZOO[name].min_size if name in ZOO else 8


def cases() -> list[Any]:
    """Every architecture at each size it takes (its smallest where it takes none), 1 and 3
    channels; the big networks at their smallest size only."""
    out = []
    for name in sorted(ARCHITECTURES):
        sizes = [s for s in SIZES if s >= smallest(name)] or [smallest(name)]
        if name in ("vgg16", "resnet50"):
            sizes = sizes[:1]
        out += [pytest.param(name, s, c, id=f"{name}-{s}px-{c}ch") for s in sizes for c in (1, 3)]
    return out


def classifier(model: dict[str, Any], channels: int, size: int) -> Classifier:
    return Classifier(
        model=model,
        train=TRAIN,
        in_channels=channels,
        num_classes=CLASSES,
        image_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        classes=[str(i) for i in range(CLASSES)],
    )


def spec(name: str) -> dict[str, Any]:
    if name == "seed_cnn":
        return SeedCnn(fc=[16]).model_dump(mode="json")
    return {"name": name}


def images(n: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


@pytest.mark.parametrize(("name", "size", "channels"), cases())
def test_every_model_trains_on_uint8_images(name: str, size: int, channels: int) -> None:
    """Logits of the right shape, finite, and a gradient reaching every trainable parameter."""
    module = classifier(spec(name), channels, size).train()
    x, y = images(2, channels, size)
    logits = module.eval()(x)
    assert logits.shape == (2, CLASSES)
    assert torch.isfinite(logits).all()
    loss = module.train().training_step((module.prepare_input(x, train=True), y), 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def imagenet_file(tmp_path: Path, name: str) -> Path:
    """A torchvision-format state dict of `name` with 1000 classes, as ImageNet weights are."""
    path = tmp_path / f"{name}-imagenet.pth"
    torch.save(torchvision_net(name, num_classes=1000).state_dict(), path)
    return path


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("channels", [1, 3])
def test_frozen_backbone_takes_no_gradient_and_keeps_its_statistics(
    tmp_path: Path, name: str, channels: int
) -> None:
    size = smallest(name) if name in ("inception_v3", "vgg16") else 32
    weights = imagenet_file(tmp_path, name)
    model = {"name": name, "weights": str(weights), "freeze": "backbone", "unfreeze_epoch": 1}
    module = classifier(model, channels, size)
    load_pretrained(module.net, name, weights)
    imagenet = torch.load(weights, weights_only=True)
    stem = f"{LAYOUTS[name].stem}.weight"
    expected_stem = imagenet[stem] if channels == 3 else imagenet[stem].sum(1, keepdim=True)
    assert torch.equal(module.net.state_dict()[stem], expected_stem)
    before = {k: v.clone() for k, v in module.net.state_dict().items() if "running_" in k}
    x, y = images(4, channels, size)
    module.train()
    module.apply_freeze(epoch=0)
    module.training_step((module.prepare_input(x, train=True), y), 0).backward()
    trained = {n for n, p in module.net.named_parameters() if p.grad is not None}
    heads = {n for n, _ in module.net.named_parameters() if module.is_head(n)}
    assert trained == heads  # the new heads learn; nothing else does
    after = {k: v for k, v in module.net.state_dict().items() if "running_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch norm stays ImageNet's
    module.zero_grad(set_to_none=True)
    module.apply_freeze(epoch=1)  # unfreeze_epoch: everything trains, batch norm learns again
    module.training_step((module.prepare_input(x, train=True), y), 0).backward()
    assert all(p.grad is not None for p in module.parameters())
    moved = [
        k
        for k, v in module.net.state_dict().items()
        if k in before and not torch.equal(before[k], v)
    ]
    assert moved or not before  # VGG-16 has no batch norm


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_checkpoint_round_trip_and_onnx_export_keep_the_logits(tmp_path: Path, name: str) -> None:
    from cnnops.checkpoints import load_classifier

    channels, size = 3, smallest(name) if name in ("inception_v3", "vgg16") else 28
    module = classifier(spec(name), channels, size)
    x, y = images(8, channels, size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    module.eval()
    restored = load_classifier(tmp_path / "last.ckpt")
    with torch.inference_mode():
        assert torch.equal(module(x), restored(x))
    path = to_onnx(restored, x[:2].numpy(), tmp_path / "model.onnx")
    assert max_abs_diff(path, restored.predict_images, x.numpy()) < 1e-4


def test_inception_trains_its_auxiliary_classifier_and_exports_without_it(tmp_path: Path) -> None:
    module = classifier({"name": "inception_v3"}, 3, 299)
    x, y = images(2, 3, 299)
    out = module.net.train()(module.prepare_input(x, train=True))
    assert isinstance(out, tuple) and out[1].shape == (2, CLASSES)  # the auxiliary logits
    module.training_step((module.prepare_input(x, train=True), y), 0).backward()
    assert module.net.AuxLogits.fc.weight.grad is not None
    assert module.eval()(x).shape == (2, CLASSES)


def test_input_size_resizes_on_the_device() -> None:
    module = classifier({"name": "mobilenet_v2", "input_size": 64}, 1, 28).eval()
    seen: list[tuple[int, ...]] = []
    module.net.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    assert module(images(2, 1, 28)[0]).shape == (2, CLASSES)
    assert seen == [(2, 1, 64, 64)]


def test_backbone_learns_at_its_own_rate() -> None:
    model = {"name": "resnet18"}
    train = {
        **TRAIN,
        "optimizer": {"lr": 0.01, "backbone_lr_mult": 0.1},
        "scheduler": {"name": "none"},
    }
    module = Classifier(
        model=model,
        train=train,
        in_channels=3,
        num_classes=CLASSES,
        image_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        classes=[str(i) for i in range(CLASSES)],
    )
    optimizer = module.configure_optimizers()
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    for n, p in module.net.named_parameters():
        assert rates[id(p)] == pytest.approx(0.01 if n.startswith("fc.") else 0.001), n


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    net = torchvision_net("resnet50", num_classes=CLASSES)
    other = imagenet_file(tmp_path, "resnet18")
    with pytest.raises(
        DataError,
        match=r"resnet18-imagenet.pth: does not fit resnet50: 'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\), resnet50 expects \(64, 64, 1, 1\)",
    ):
        load_pretrained(net, "resnet50", other)
    with pytest.raises(
        DataError, match=r"sha256 is [0-9a-f]{64}, model.weights_sha256 expects 0{64}"
    ):
        load_pretrained(net, "resnet50", other, "0" * 64)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth: model.weights unreadable"):
        load_pretrained(net, "resnet50", garbage)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(DataError, match="list.pth: model.weights is not a state dict"):
        load_pretrained(net, "resnet50", listing)
    with pytest.raises(DataError, match="absent.pth: model.weights: no such file"):
        load_pretrained(net, "resnet50", tmp_path / "absent.pth")


def test_checkpoint_hparams_rebuild_the_same_section() -> None:
    model = {"name": "mobilenet_v2", "weights": "w.pth", "freeze": "backbone", "unfreeze_epoch": 2}
    assert parse_model(parse_model(model).model_dump(mode="json")) == parse_model(model)


def test_onnx_parity_holds_when_resizing(tmp_path: Path) -> None:
    module = classifier({"name": "mobilenet_v2", "input_size": 40}, 3, 28).eval()
    x = images(4, 3, 28)[0].numpy()
    path = to_onnx(module, x[:1], tmp_path / "model.onnx")
    assert max_abs_diff(path, module.predict_images, x) < 1e-4
    assert np.isfinite(module.predict_images(x)).all()
