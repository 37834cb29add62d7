"""The augmentation spec applied to whole batches on the training device (the fast path's engine).

It reads the same resolved vocabulary as the Albumentations engine (`cnnops.augment.resolve`) and
draws each parameter from the same distribution, one draw per image, so the two engines are
interchangeable (tests compare their statistics). Geometry goes through one `affine_grid` +
`grid_sample` per transform; pixel ops are elementwise. Input is uint8 or float (N, C, H, W) pixel
values; output is float pixel values in [0, 255], left unrounded (the network's input is float).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The entries this engine implements; a spec using others (blur, elastic) trains on the
# Albumentations engine instead.
SUPPORTED = {
    "affine",
    "hflip",
    "vflip",
    "random_resized_crop",
    "crop_and_pad",
    "brightness_contrast",
    "gauss_noise",
    "coarse_dropout",
}

Resolved = list[tuple[str, float, dict[str, float]]]
Magnitude = float | torch.Tensor
"""A transform parameter: one value for the batch, or one per image (N,)."""


def supports(resolved: Resolved) -> bool:
    return all(name in SUPPORTED for name, _, _ in resolved)


class BatchAugment(nn.Module):
    """Applies resolved transforms to a uint8 batch; each image draws its own parameters."""

    def __init__(self, resolved: Resolved, seed: int = 0) -> None:
        super().__init__()
        unsupported = sorted({n for n, _, _ in resolved} - SUPPORTED)
        if unsupported:
            raise ValueError(f"no batched implementation for {unsupported}")
        self.resolved = resolved
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._restored: torch.Tensor | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._restored is not None:
                self._generator.set_state(self._restored)
                self._restored = None
        return self._generator

    def restore_generators(self, states: list[torch.Tensor]) -> None:
        """Continue from `states` (from `generators()` of a checkpointed run) at the next draw."""
        self._generator, self._restored = None, states[0]

    def generators(self) -> list[torch.Generator]:
        """The generators drawn from so far (a CUDA graph capturing this module registers them)."""
        return [] if self._generator is None else [self._generator]

    @torch.autocast("cuda", enabled=False)
    def forward(self, x: torch.Tensor, strength: torch.Tensor | None = None) -> torch.Tensor:
        """`x` augmented; `strength` (N,), when given, scales each image's magnitudes as
        `augment.strength` scales the spec's (resolve the spec at strength 1 for it): images of
        several tuning trials, each at its own strength, go through in one batch."""
        g = self._rng(x.device)
        out = x.float()
        for name, p, v in self.resolved:
            values: dict[str, Magnitude] = {**v} if strength is None else _scaled(name, v, strength)
            if p >= 1.0:
                out = _OPS[name](out, values, g)
                continue
            apply = torch.rand(len(x), device=x.device, generator=g) < p
            out = torch.where(apply.view(-1, 1, 1, 1), _OPS[name](out, values, g), out)
        return out


def _scaled(name: str, v: dict[str, float], strength: torch.Tensor) -> dict[str, Magnitude]:
    """The magnitudes `augment.strength` scales, one per image; a zero stays a zero (the
    component is skipped), the others (hole counts) stay as they are."""
    from cnnops.augment import VOCABULARY

    params = VOCABULARY[name].params
    return {k: value * strength if params[k].scaled and value else value for k, value in v.items()}


def _on(magnitude: Magnitude) -> bool:
    """Whether a component acts: per-image magnitudes always take their draws."""
    return isinstance(magnitude, torch.Tensor) or magnitude > 0


def _uniform(
    n: int,
    low: Magnitude,
    high: Magnitude,
    g: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=g)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample `x` at output→input affine `theta` (N, 2, 3) in normalized coordinates; zeros outside."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    # As Albumentations' Affine: scale, shear and rotate about the centre, then translate;
    # x and y scale, shear and translate draw independently (keep_ratio=False). Components with
    # zero magnitude are skipped, which keeps a translate-only spec at a handful of kernels.
    n, dev = len(x), x.device
    h, w = x.shape[-2:]
    forward = None
    if _on(v["scale"]):
        sx, sy = (_uniform(n, 1 - v["scale"], 1 + v["scale"], g, dev) for _ in range(2))
        forward = torch.diag_embed(torch.stack([sx, sy], 1))
    if _on(v["shear"]):
        hx, hy = (
            torch.tan(torch.deg2rad(_uniform(n, -v["shear"], v["shear"], g, dev))) for _ in range(2)
        )
        one = torch.ones_like(hx)
        shear = torch.stack([one, hx, hy, one], 1).view(n, 2, 2)
        forward = shear if forward is None else shear @ forward
    if _on(v["rotate"]):
        angle = torch.deg2rad(_uniform(n, -v["rotate"], v["rotate"], g, dev))
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)
        forward = rot if forward is None else rot @ forward
    if forward is None:
        matrix = torch.eye(2, device=dev).expand(n, 2, 2)
    else:
        # Pixel units → normalized units, so rotation stays a rotation on non-square images.
        matrix = _inverse_2x2(forward)
        if h != w:
            matrix[:, 0, 1] *= h / w
            matrix[:, 1, 0] *= w / h
    if _on(v["translate"]):
        tx, ty = (_uniform(n, -v["translate"], v["translate"], g, dev) for _ in range(2))
        shift = torch.stack([_whole_pixels(tx, w), _whole_pixels(ty, h)], 1).view(n, 2, 1) * 2
        offset = -(matrix @ shift)
    else:
        offset = torch.zeros(n, 2, 1, device=dev)
    return _warp(x, torch.cat([matrix, offset], dim=2))


def _whole_pixels(fraction: torch.Tensor, side: int) -> torch.Tensor:
    # Albumentations truncates shifts and crop/pad amounts to whole pixels (int()); so do we,
    # or small images would see larger moves on this engine than on the other.
    return torch.trunc(fraction * side) / side


def _inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    # Closed form: no solver launch, exact in float32 for these well-conditioned maps.
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a * d - b * c
    return torch.stack([d, -b, -c, a], 1).view(-1, 2, 2) / det.view(-1, 1, 1)


def hflip(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    return x.flip(-1)


def vflip(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    return x.flip(-2)


def random_resized_crop(
    x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator
) -> torch.Tensor:
    n, dev = len(x), x.device
    area = _uniform(n, 1 - v["area"], 1.0, g, dev)
    spread = (
        torch.log1p(v["ratio"]) if isinstance(v["ratio"], torch.Tensor) else math.log1p(v["ratio"])
    )
    log_ratio = _uniform(n, -spread, spread, g, dev)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(n, -(1 - sx), 1 - sx, g, dev)
    cy = _uniform(n, -(1 - sy), 1 - sy, g, dev)
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, cx, zero, sy, cy], 1).view(n, 2, 3)
    return _warp(x, theta)


def crop_and_pad(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    # Each side moves by its own fraction in [-percent, percent] (crop < 0 < pad), then the
    # result is resized back: an axis-aligned affine map per image.
    n, dev = len(x), x.device
    h, w = x.shape[-2:]
    top, right, bottom, left = (
        _whole_pixels(_uniform(n, -v["percent"], v["percent"], g, dev), side)
        for side in (h, w, h, w)
    )
    zero = torch.zeros_like(top)
    theta = torch.stack(
        [1 + left + right, zero, right - left, zero, 1 + top + bottom, bottom - top], 1
    ).view(n, 2, 3)
    return _warp(x, theta)


def brightness_contrast(
    x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator
) -> torch.Tensor:
    # Albumentations (brightness_by_max): out = alpha * x + beta * 255, alpha = 1 + U(±contrast).
    n, dev = len(x), x.device
    alpha = 1 + _uniform(n, -v["contrast"], v["contrast"], g, dev)
    beta = _uniform(n, -v["brightness"], v["brightness"], g, dev) * 255
    return (x * alpha.view(-1, 1, 1, 1) + beta.view(-1, 1, 1, 1)).clamp(0, 255)


def gauss_noise(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    std = _uniform(len(x), 0.0, v["std"], g, x.device) * 255
    noise = torch.randn(x.shape, device=x.device, generator=g) * std.view(-1, 1, 1, 1)
    return (x + noise).clamp(0, 255)


def coarse_dropout(x: torch.Tensor, v: dict[str, Magnitude], g: torch.Generator) -> torch.Tensor:
    n, dev = len(x), x.device
    h, w = x.shape[-2:]
    k = int(v["holes"])
    size = v["size"].repeat_interleave(k) if isinstance(v["size"], torch.Tensor) else v["size"]
    count = torch.randint(1, k + 1, (n, 1), device=dev, generator=g)
    hh = (_uniform(n * k, size / 2, size, g, dev) * h).long().clamp(min=1).view(n, k)
    ww = (_uniform(n * k, size / 2, size, g, dev) * w).long().clamp(min=1).view(n, k)
    y0 = (torch.rand(n, k, device=dev, generator=g) * (h - hh + 1)).long()
    x0 = (torch.rand(n, k, device=dev, generator=g) * (w - ww + 1)).long()
    yy = torch.arange(h, device=dev).view(1, 1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, 1, w)
    inside = (
        (yy >= y0[..., None, None])
        & (yy < (y0 + hh)[..., None, None])
        & (xx >= x0[..., None, None])
        & (xx < (x0 + ww)[..., None, None])
    )
    active = torch.arange(k, device=dev).view(1, k) < count
    holes = (inside & active[..., None, None]).any(dim=1, keepdim=True)
    return x.masked_fill(holes, 0.0)


_OPS: dict[str, Callable[[torch.Tensor, dict[str, Magnitude], torch.Generator], torch.Tensor]] = {
    "affine": affine,
    "hflip": hflip,
    "vflip": vflip,
    "random_resized_crop": random_resized_crop,
    "crop_and_pad": crop_and_pad,
    "brightness_contrast": brightness_contrast,
    "gauss_noise": gauss_noise,
    "coarse_dropout": coarse_dropout,
}
