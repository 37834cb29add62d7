"""What a network learned, drawn: every architecture's pictures, the module left as it was, and
Grad-CAM pointing where the class evidence is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cnnops import insight
from cnnops.config import ARCHITECTURES
from cnnops.insight import explain, grad_cam, kernel_mosaic, saliency_block, stage_ends
from cnnops.module import Classifier
from tests.models.test_zoo import CLASSES, classifier, images, smallest, spec

NAMES = [str(i) for i in range(CLASSES)]


def cases() -> list[Any]:
    """Every architecture at its smallest size, 3 channels; the seed CNN in grey too."""
    out = [pytest.param("seed_cnn", 1, id="seed_cnn-1ch")]
    for name in sorted(ARCHITECTURES):
        marks = [pytest.mark.slow] if name == "inception_v3" else []  # 299 px
        out.append(pytest.param(name, 3, id=f"{name}-3ch", marks=marks))
    return out


def hooks(module: nn.Module) -> list[int]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [len(getattr(m, kind)) for m in module.modules() for kind in kinds]


def drawn(path: Path) -> bool:
    """A PNG with pictures on it: mostly ink (a figure of titles alone is ~1 %), and more
    colours than titles over flat tiles give (~130)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[..., :3]
    ink = (rgb < 0.98).any(axis=-1).mean()
    return bool(ink > 0.2 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200)


def mixed_state(module: Classifier) -> dict[str, Any]:
    """Train mode with one batch norm in eval mode and the stem frozen, as a frozen-backbone
    epoch leaves a module: explain must put back exactly this."""
    module.train()
    for m in module.net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):  # VGG-16 has no norm
            m.eval()
            break
    insight.first_conv(module.net)[1].weight.requires_grad_(False)
    return {
        "modes": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "hooks": hooks(module),
    }


@pytest.mark.parametrize(("name", "channels"), cases())
def test_explain_draws_every_architecture_and_leaves_the_module_as_it_was(
    tmp_path: Path, name: str, channels: int
) -> None:
    size = smallest(name)
    module = classifier(spec(name), channels, size)
    before = mixed_state(module)
    x, y = images(1 if name == "inception_v3" else 4, channels, size)
    paths = explain(module, x.numpy(), y.numpy(), NAMES, tmp_path)
    assert set(paths) == {"kernels", "feature_maps", "gradcam"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    assert all(drawn(p) for p in paths.values()), paths
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before["state"].items())
    assert [m.training for m in module.modules()] == before["modes"]
    assert [p.requires_grad for p in module.parameters()] == before["requires_grad"]
    assert all(p.grad is None for p in module.parameters())
    assert hooks(module) == before["hooks"]


class TwoDetectors(nn.Module):
    """Channel k of the block lights up where input channel k is bright (4x4 cells of a 16 px
    image); class 0 scores channel 0 minus channel 1, class 1 scores channel 1."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(), nn.AvgPool2d(4))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2, bias=False)
        )
        with torch.no_grad():
            self.block[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.head[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
        self.requires_grad_(False)  # as a frozen backbone: Grad-CAM needs no parameter gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def quadrant(cam: torch.Tensor) -> tuple[str, str]:
    row, col = divmod(int(cam.argmax()), cam.shape[-1])
    half = cam.shape[-1] // 2
    return ("top" if row < half else "bottom", "left" if col < half else "right")


def test_grad_cam_peaks_in_the_quadrant_holding_the_class_evidence() -> None:
    # Class 0's evidence, a patch in the top-left; class 1's, three times brighter, bottom-right.
    # Activations alone would point at the bright patch for both; Grad-CAM's gradient weights
    # (negative for channel 1 in class 0's score) must tell them apart.
    x = torch.zeros(1, 2, 16, 16)
    x[0, 0, 2:6, 2:6] = 1.0
    x[0, 1, 10:14, 10:14] = 3.0
    net = TwoDetectors()
    assert net(x).argmax(1).item() == 1
    cams = grad_cam(net, net.block, x, {str(k): torch.tensor([k]) for k in (0, 1)}, (32, 32))
    first, second = cams["0"][0], cams["1"][0]
    assert first.shape == (32, 32)  # upsampled to the size asked: the image's, not the block's
    assert quadrant(first) == ("top", "left")
    assert quadrant(second) == ("bottom", "right")
    assert first.max() == pytest.approx(1.0) and first.min() == 0.0
    assert first[20:28, 20:28].max() == 0.0  # on class 1's patch: the ReLU drops evidence against


def test_gradcam_is_drawn_for_the_misclassified_images_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = classifier(spec("seed_cnn"), 1, 8).eval()
    x, _ = images(6, 1, 8)
    with torch.no_grad():
        pred = module(x).argmax(1).numpy()
    drawn_calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        insight, "plot_gradcam", lambda x, cams, labels, *_: drawn_calls.append(locals())
    )

    y = pred.copy()
    y[[1, 4]] = (pred[[1, 4]] + 1) % CLASSES
    paths = explain(module, x.numpy(), y, NAMES, tmp_path / "wrong")
    assert paths["gradcam"].name == "gradcam_misclassified.png"
    call = drawn_calls.pop()
    assert np.array_equal(call["x"], x.numpy()[[1, 4]])
    assert list(call["cams"]) == ["predicted class", "true class"]
    assert call["labels"][0] == f"true {y[1]}\npred {pred[1]}"

    paths = explain(module, x.numpy(), pred, NAMES, tmp_path / "right")
    assert paths["gradcam"].name == "gradcam_correct.png"
    call = drawn_calls.pop()
    assert len(call["x"]) == 6 and list(call["cams"]) == ["predicted class"]


def test_kernels_are_scaled_each_on_its_own_in_rgb_or_grey() -> None:
    weight = torch.randn(5, 3, 3, 3) * torch.tensor([1e-3, 1.0, 1e3, 1.0, 1.0]).view(5, 1, 1, 1)
    rgb = kernel_mosaic(weight)
    assert rgb.shape == (2 * 4 + 1, 3 * 4 + 1, 3)  # 2 rows of 3 tiles of 3x3, 1 px apart
    for i in range(5):
        top, left = 1 + (i // 3) * 4, 1 + (i % 3) * 4
        tile = rgb[top : top + 3, left : left + 3]
        assert tile.min() == 0.0 and tile.max() == pytest.approx(1.0)
    grey = kernel_mosaic(torch.randn(4, 1, 5, 5))
    assert grey.shape == (2 * 6 + 1, 2 * 6 + 1)


def test_stages_end_where_the_resolution_drops_and_saliency_skips_one_pixel_maps() -> None:
    seen = {n: torch.zeros(1, 2, s, s) for n, s in zip("abcde", (8, 8, 4, 4, 1), strict=True)}
    assert list(stage_ends(seen, by_resolution=True)) == ["b", "d", "e"]
    assert list(stage_ends(seen, by_resolution=False)) == list("abcde")
    assert saliency_block(stage_ends(seen, by_resolution=True)) == "d"


def test_evaluate_replaces_its_own_pictures_and_keeps_what_else_is_in_the_folder(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from cnnops.data.prepare import Prepared
    from cnnops.evaluate import _insight

    module = classifier(spec("seed_cnn"), 1, 8).eval()
    x, _ = images(6, 1, 8)
    with torch.no_grad():
        pred = module(x).argmax(1).numpy()
    y = (pred + 1) % CLASSES  # every image misclassified
    split = {"train": x.numpy(), "val": x.numpy(), "test": x.numpy()}
    data = Prepared(split, {k: y for k in split}, NAMES, [0.5], [0.25])
    folder = tmp_path / "insight"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    (folder / "zz_seen-inputs.png").write_bytes(b"mine")
    (folder / "gradcam_correct.png").write_bytes(b"an earlier model's")
    model = SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(model=module))
    paths = _insight(model, data, pred, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["notes.md", "zz_seen-inputs.png", *(p.name for p in paths.values())]
    )
    assert (folder / "zz_seen-inputs.png").read_bytes() == b"mine"
