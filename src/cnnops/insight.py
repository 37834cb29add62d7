"""What a network learned, drawn: its first-layer kernels, the feature maps of each conv block,
and Grad-CAM saliency on the test images it got wrong (Selvaraju et al., 2017,
https://arxiv.org/abs/1610.02391)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnops import reports

BLOCKS = {
    "resnet18": r"layer\d",
    "resnet50": r"layer\d",
    "vgg16": r"features\.\d+",
    "inception_v3": r"maxpool1|Mixed_\w+",
    "efficientnet_b0": r"features\.\d+",
    "mobilenet_v2": r"features\.\d+",
}
"""The modules of each torchvision network's body, by name; the last one at each resolution
ends a stage. Kept here rather than in models/zoo.py: models/ is a training dependency in
dvc.yaml, and redrawing these pictures must not retrain."""

FEATURE_ROWS = 4
"""How many images the feature maps are drawn for."""
GRADCAM_COLUMNS = 8
"""How many images Grad-CAM is drawn for."""
PICTURES = (
    "first_layer_kernels.png",
    "feature_maps_per_block.png",
    "gradcam_misclassified.png",
    "gradcam_correct.png",
)
"""Every file `explain` may write: a caller clearing an earlier model's pictures removes these."""


class Trained(Protocol):
    """What `explain` reads of a model: a `Classifier`, or the registry's prediction network."""

    net: nn.Module

    @property
    def hparams(self) -> Any: ...
    def normalize(self, x: torch.Tensor) -> torch.Tensor: ...
    def modules(self) -> Iterator[nn.Module]: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...
    def eval(self) -> Any: ...


def explain(
    module: Trained, x: np.ndarray, y: np.ndarray, classes: list[str], out_dir: Path
) -> dict[str, Path]:
    """Draw into `out_dir` what `module` learned, seen on uint8 images `x` (N, C, H, W) labelled
    `y`: first-layer kernels, feature maps per conv block of the first images, and Grad-CAM of
    the misclassified ones (of the first ones where none is). The module is left as it was.

    >>> explain(model, x_test[:16], y_test[:16], classes, Path("reports/insight"))["gradcam"]
    PosixPath('reports/insight/gradcam_misclassified.png')
    """
    y, net = np.asarray(y), module.net
    name = architecture(module)
    candidates = conv_blocks(net, name)
    with inspected(module):
        device = next(module.parameters()).device
        net_x = module.normalize(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        with recorded(candidates) as seen, torch.no_grad():
            pred = net(net_x).argmax(1).cpu().numpy()
        stages = stage_ends(seen, by_resolution=name != "seed_cnn")
        wrong = np.flatnonzero(pred != y)
        picked = (wrong if len(wrong) else np.arange(len(x)))[:GRADCAM_COLUMNS]
        targets = {"predicted class": torch.as_tensor(pred[picked])}
        if len(wrong):
            targets["true class"] = torch.as_tensor(y[picked])
        block = saliency_block(stages)
        size = (x.shape[-2], x.shape[-1])
        cams = grad_cam(net, candidates[block], net_x[picked], targets, size)
    kind = "misclassified" if len(wrong) else "correct"
    paths = {
        "kernels": out_dir / "first_layer_kernels.png",
        "feature_maps": out_dir / "feature_maps_per_block.png",
        "gradcam": out_dir / f"gradcam_{kind}.png",
    }
    plot_kernels(*first_conv(net), paths["kernels"])
    plot_feature_maps(x[:FEATURE_ROWS], stages, paths["feature_maps"])
    labels = [f"true {classes[y[i]]}\npred {classes[pred[i]]}" for i in picked]
    side = "x".join(map(str, stages[block].shape[-2:]))
    title = f"Grad-CAM at {block} ({side}) of {kind} test images"
    plot_gradcam(x[picked], cams, labels, title, paths["gradcam"])
    return paths


def architecture(module: Trained) -> str:
    """The registered name of `module`'s architecture, from the hyperparameters it was built by."""
    from cnnops.config import parse_model

    return parse_model(dict(module.hparams["model"])).name


@contextmanager
def inspected(module: Trained) -> Iterator[None]:
    """`module` in eval mode inside the block, every submodule's own mode put back after it (a
    frozen backbone keeps its batch norm in eval mode while the rest trains)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def recorded(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """The output of each of `modules`, by name, in forward order, from the forward passes run
    inside the block; the hooks are gone after it."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        return lambda _module, _args, output: seen.__setitem__(name, output)

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def conv_blocks(net: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules whose outputs may be drawn as conv blocks: the body modules (`BLOCKS`) of a
    torchvision network; the ReLU of each of the seed CNN's blocks, its activations before
    pooling (Grad-CAM reads the last conv layer's, not the pooled ones)."""
    if name != "seed_cnn":
        return {n: m for n, m in net.named_modules() if re.fullmatch(BLOCKS[name], n)}
    relus = [m for m in net.get_submodule("features").children() if isinstance(m, nn.ReLU)]
    return {f"block{b}": m for b, m in enumerate(relus, start=1)}


def stage_ends(seen: dict[str, torch.Tensor], by_resolution: bool) -> dict[str, torch.Tensor]:
    """The recorded blocks to draw, on the CPU: all, or `by_resolution` the last one before the
    resolution drops (a torchvision body's stages)."""
    names = list(seen)
    sizes = [seen[n].shape[-2:] for n in names] + [None]
    kept = [n for i, n in enumerate(names) if not by_resolution or sizes[i] != sizes[i + 1]]
    return {n: seen[n].detach().float().cpu() for n in kept}


def saliency_block(stages: dict[str, torch.Tensor]) -> str:
    """The deepest block of more than one pixel: a 1x1 map holds no location."""
    spread = [n for n, a in stages.items() if a.shape[-2] * a.shape[-1] > 1]
    return (spread or list(stages))[-1]


def grad_cam(
    net: nn.Module,
    block: nn.Module,
    x: torch.Tensor,
    targets: dict[str, torch.Tensor],
    size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Grad-CAM (N, *size) of `net` on `x` for each vector of target classes, by the same key,
    each map scaled to [0, 1]: ReLU of `block`'s output channels weighted by the mean gradient
    of the class score over each channel."""
    with recorded({"block": block}) as seen, torch.enable_grad():
        # The input takes the gradient: a frozen network builds its graph too, and no
        # parameter's requires_grad or .grad is touched (autograd.grad, not backward).
        logits = net(x.detach().requires_grad_())
    a, cams = seen["block"], {}
    for i, (key, target) in enumerate(targets.items()):
        score = logits.gather(1, target.to(logits.device)[:, None]).sum()
        (grad,) = torch.autograd.grad(score, a, retain_graph=i + 1 < len(targets))
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam.float(), size=size, mode="bilinear").squeeze(1).cpu()
        cams[key] = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return cams


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """The stem, by name: the convolution that sees the image."""
    return next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))


def kernel_mosaic(weight: torch.Tensor) -> np.ndarray:
    """Kernels (O, C, k, k) as one image, a tile each on a white grid, each min-max scaled to
    [0, 1]: RGB (H, W, 3) for 3 input channels, else grey (H, W), the mean over channels."""
    w = weight.detach().float().cpu()
    w = w if w.shape[1] == 3 else w.mean(1, keepdim=True)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (w.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    n, c, kh, kw = w.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    mosaic = np.ones((rows * (kh + 1) + 1, cols * (kw + 1) + 1, c), dtype=np.float32)
    for i, kernel in enumerate(w.numpy()):
        top, left = 1 + (i // cols) * (kh + 1), 1 + (i % cols) * (kw + 1)
        mosaic[top : top + kh, left : left + kw] = kernel.transpose(1, 2, 0)
    return mosaic if c == 3 else mosaic[:, :, 0]


def plot_kernels(name: str, conv: nn.Conv2d, path: Path) -> None:
    plt = reports._pyplot()
    mosaic = kernel_mosaic(conv.weight)
    fig, ax = plt.subplots(figsize=(6, 6 * mosaic.shape[0] / mosaic.shape[1] + 0.5))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    out, c, kh, kw = conv.weight.shape
    colour = "RGB" if c == 3 else ("grey" if c == 1 else f"grey: mean of {c} channels")
    ax.set_title(
        f"first-layer kernels ({name}): {out} of {kh}x{kw}, {colour}, each min-max scaled",
        fontsize=9,
    )
    reports._save(fig, path)


def _show(ax: Any, image: np.ndarray, grey: bool = False) -> None:
    """A uint8 (C, H, W) image: RGB for 3 channels unless `grey`, else the mean of its channels."""
    if image.shape[0] == 3 and not grey:
        ax.imshow(image.transpose(1, 2, 0))
    else:
        ax.imshow(image.mean(0), cmap="gray", vmin=0, vmax=255)


def plot_feature_maps(x: np.ndarray, maps: dict[str, torch.Tensor], path: Path) -> None:
    """Rows: images; columns: the image, then the mean |activation| over channels per block."""
    plt = reports._pyplot()
    # A 1x1 map has nothing to show, as long as some block has more.
    maps = {n: a for n, a in maps.items() if a.shape[-2] * a.shape[-1] > 1} or maps
    rows, cols = len(x), len(maps) + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(1.6 * cols, 4.5), 1.6 * rows + 1.0), squeeze=False
    )
    for r, image in enumerate(x):
        _show(axes[r][0], image)
        for c, (name, a) in enumerate(maps.items(), start=1):
            axes[r][c].imshow(a[r].abs().mean(0).numpy(), cmap="viridis", interpolation="nearest")
            if r == 0:
                axes[r][c].set_title(f"{name}\n{'x'.join(map(str, a.shape[1:]))}", fontsize=8)
    axes[0][0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(
        "feature maps per conv block\nmean |activation| over channels, each on its own scale",
        fontsize=9,
    )
    reports._save(fig, path)


def plot_gradcam(
    x: np.ndarray, cams: dict[str, torch.Tensor], labels: list[str], title: str, path: Path
) -> None:
    """Columns: images; rows: the image, then each row of Grad-CAM maps laid over it."""
    plt = reports._pyplot()
    rows, cols = len(cams) + 1, len(x)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(1.5 * cols + 0.6, 4.5), 1.6 * rows + 0.9), squeeze=False
    )
    for c, image in enumerate(x):
        _show(axes[0][c], image)
        axes[0][c].set_title(labels[c], fontsize=7)
        for r, cam in enumerate(cams.values(), start=1):
            _show(axes[r][c], image, grey=True)  # a colour heat map reads best over grey
            axes[r][c].imshow(cam[c].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, name in enumerate(cams, start=1):
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    reports._save(fig, path)
