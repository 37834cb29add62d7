"""The prepare stage: seeded stratified splits stored as compact uint8 arrays, plus statistics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cnnops.data.sources import load_raw
from cnnops.errors import DataError
from cnnops.runs import atomic_dir, check_replaceable

if TYPE_CHECKING:
    from cnnops.config import Config

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    """The prepared splits: uint8 images (N, C, H, W), int64 labels, and what describes them."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    classes: list[str]
    mean: list[float]
    std: list[float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x["train"].shape[1:])  # type: ignore[return-value]


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices of `y` into the remainder, then one part per fraction, stratified by class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cuts = np.cumsum([round(f * len(idx)) for f in fractions])
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.append(chunk)
    *sized, rest = (np.sort(np.concatenate(p)) for p in parts)
    return [rest, *sized]


def resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    import torch
    import torch.nn.functional as F

    t = F.interpolate(
        torch.from_numpy(x).float(), size=(size, size), mode="bilinear", antialias=True
    )
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def split(config: Config, raw: Path) -> Prepared:
    data = load_raw(config, raw)
    p = config.prepare
    x, y = data.train
    if data.test is None:
        train, val, test = stratified_split(y, [p.val_fraction, p.test_fraction], p.seed)
        xs = {"train": x[train], "val": x[val], "test": x[test]}
        ys = {"train": y[train], "val": y[val], "test": y[test]}
    else:
        train, val = stratified_split(y, [p.val_fraction], p.seed)
        xs = {"train": x[train], "val": x[val], "test": data.test[0]}
        ys = {"train": y[train], "val": y[val], "test": data.test[1]}
    if p.image_size:
        xs = {k: resize(v, p.image_size) for k, v in xs.items()}
    for name in SPLITS:
        if len(ys[name]) == 0:
            raise DataError(
                f"prepare: the {name} split is empty; adjust prepare.val_fraction/test_fraction"
            )
    pixels = xs["train"].astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3)).tolist()
    std = np.maximum(pixels.std(axis=(0, 2, 3)), 1e-6).tolist()
    return Prepared(xs, ys, data.classes, mean, std)


def save(prepared: Prepared, out: Path) -> None:
    with atomic_dir(out, "prepare") as tmp:
        for name in SPLITS:
            np.save(tmp / f"{name}_x.npy", np.ascontiguousarray(prepared.x[name]))
            np.save(tmp / f"{name}_y.npy", prepared.y[name])
        meta = {
            "classes": prepared.classes,
            "mean": prepared.mean,
            "std": prepared.std,
            "shape": list(prepared.shape),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(folder: Path, mmap: bool = False) -> Prepared:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{folder}: prepared data missing; run `cnnops prepare` first")
    meta = json.loads(meta_path.read_text())
    mode: Literal["r"] | None = "r" if mmap else None
    try:
        xs = {s: np.load(folder / f"{s}_x.npy", mmap_mode=mode) for s in SPLITS}
        ys = {s: np.load(folder / f"{s}_y.npy") for s in SPLITS}
    except (OSError, ValueError) as e:
        raise DataError(
            f"{folder}: prepared data unreadable ({e}); rerun `cnnops prepare`"
        ) from None
    return Prepared(xs, ys, meta["classes"], meta["mean"], meta["std"])


def summary(prepared: Prepared) -> dict:
    counts = {
        name: {
            "total": int(len(prepared.y[name])),
            "per_class": {
                cls: int((prepared.y[name] == i).sum()) for i, cls in enumerate(prepared.classes)
            },
        }
        for name in SPLITS
    }
    return {
        "shape": list(prepared.shape),
        "num_classes": len(prepared.classes),
        "mean": prepared.mean,
        "std": prepared.std,
        "splits": counts,
    }


def prepare(config: Config, raw: Path, out: Path, report: Path) -> dict:
    check_replaceable(out, "prepare")  # before the work, not after it
    prepared = split(config, raw)
    save(prepared, out)
    stats = summary(prepared)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
