"""The prepare stage: seeded stratified splits stored as compact uint8 arrays, plus statistics.

Image folders are prepared in bounded memory: images are decoded in worker processes into a
cache keyed by content hash, then copied one by one into each split's `.npy` file while the
per-channel statistics are counted exactly. Array sources (digits, MNIST, CIFAR) are small
and go through memory."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cnnops import progress
from cnnops.data.images import Cache, decode_all
from cnnops.data.sources import image_folder, load_raw, original_name
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


def resize(x: np.ndarray, size: int, desc: str = "resize", chunk: int = 1024) -> np.ndarray:
    """uint8 images (N, C, H, W) resized to `size` (bilinear, antialiased), `chunk` images at a
    time behind a progress bar: a float copy of a whole split, upscaled, may not fit in memory."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    import torch
    import torch.nn.functional as F

    out = np.empty((*x.shape[:-2], size, size), dtype=np.uint8)
    with progress.bar(len(x), desc, unit="img") as bar:
        for start in range(0, len(x), chunk):
            t = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk])).float()
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
            out[start : start + len(t)] = t.round().clamp(0, 255).to(torch.uint8).numpy()
            bar.update(len(t))
    return out


class ChannelStats:
    """Per-channel mean and std of uint8 images, exact: a histogram of the 256 values per
    channel, fed image by image or chunk by chunk, never a float copy of the pixels."""

    def __init__(self, channels: int) -> None:
        self.counts = np.zeros((channels, 256), dtype=np.int64)

    def add(self, x: np.ndarray) -> None:
        """Count `x`, shaped (C, H, W) or (N, C, H, W)."""
        per_channel = x.reshape(-1, *x.shape[-3:]).swapaxes(0, 1)
        for c, values in enumerate(per_channel):
            self.counts[c] += np.bincount(values.ravel(), minlength=256)

    def mean_std(self) -> tuple[list[float], list[float]]:
        v = np.arange(256, dtype=np.float64) / 255.0
        n = self.counts.sum(axis=1)
        mean = (self.counts @ v) / n
        var = (self.counts @ (v * v)) / n - mean * mean
        return mean.tolist(), np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-6).tolist()


def statistics(x: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    stats = ChannelStats(x.shape[1])
    for start in range(0, len(x), chunk):
        stats.add(x[start : start + chunk])
    return stats.mean_std()


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
        xs = {k: resize(v, p.image_size, f"resize {k}") for k, v in xs.items()}
    check_splits(ys)
    mean, std = statistics(xs["train"])
    return Prepared(xs, ys, data.classes, mean, std)


def check_splits(parts: dict[str, np.ndarray]) -> None:
    """Every split needs images: an empty one is a DataError naming it."""
    for name in SPLITS:
        if len(parts[name]) == 0:
            raise DataError(
                f"prepare: the {name} split is empty; adjust prepare.val_fraction/test_fraction"
            )


def save(prepared: Prepared, out: Path) -> None:
    with atomic_dir(out, "prepare") as tmp:
        for name in SPLITS:
            np.save(tmp / f"{name}_x.npy", np.ascontiguousarray(prepared.x[name]))
            np.save(tmp / f"{name}_y.npy", prepared.y[name])
        _write_meta(tmp, prepared.classes, prepared.mean, prepared.std, prepared.shape)


def _write_meta(
    folder: Path, classes: list[str], mean: list[float], std: list[float], shape: tuple
) -> None:
    meta = {"classes": classes, "mean": mean, "std": std, "shape": list(shape)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


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
    if config.fetch.source == "imagefolder":
        stats = prepare_folder(config, raw, out, report.parent / "data_errors.json")
    else:
        prepared = split(config, raw)
        save(prepared, out)
        stats = summary(prepared)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def cache_folder(out: Path) -> Path:
    """Where prepare keeps decoded images between runs: beside the prepared folder, which
    DVC removes before each run."""
    return out.with_name(f"{out.name}.cache")


def prepare_folder(config: Config, raw: Path, out: Path, errors: Path) -> dict:
    """Prepare an image folder in bounded memory; every bad file is found in one pass."""
    p = config.prepare

    def name(path: Path) -> str:
        return original_name(raw, path)

    if not raw.is_dir():
        raise DataError(f"{raw}: data directory missing; run `cnnops fetch` first")
    folder, target = image_folder(raw, config)
    cache = Cache(cache_folder(out), target)
    cache.open()
    verdicts = decode_all(folder.files, cache, p.workers)
    decoded = sum(v.decoded for v in verdicts)
    bad = [
        {"file": name(f), "reason": v.reason}
        for f, v in zip(folder.files, verdicts, strict=True)
        if v.reason
    ]
    if bad and p.on_bad_file == "error":
        errors.parent.mkdir(parents=True, exist_ok=True)
        errors.write_text(json.dumps({"bad_files": bad}, indent=2) + "\n")
        first = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:3])
        raise DataError(
            f"{len(bad)} bad image file(s) of {len(folder.files)}, all listed in {errors}: "
            f"{first}{' ...' if len(bad) > 3 else ''}; fix or remove them, or set "
            "prepare.on_bad_file: skip"
        )
    errors.unlink(missing_ok=True)  # this stage's own list, from a run now fixed
    good = np.array([v.reason is None for v in verdicts], dtype=bool)
    keys = [v.key for v in verdicts if v.reason is None]
    labels = folder.labels[good]
    for label, cls in enumerate(folder.classes):
        if not (labels == label).any():
            raise DataError(
                f"{name(folder.root / cls)}: every image of class {cls!r} is a bad file "
                "(listed in reports/data.json); a class needs images"
            )
    train, val, test = stratified_split(labels, [p.val_fraction, p.test_fraction], p.seed)
    parts = {"train": train, "val": val, "test": test}
    check_splits(parts)
    stats = ChannelStats(cache.target.channels)
    with atomic_dir(out, "prepare") as tmp:
        for split_name, idx in parts.items():
            _write_images(
                tmp / f"{split_name}_x.npy",
                [keys[i] for i in idx],
                cache,
                stats if split_name == "train" else None,
            )
            np.save(tmp / f"{split_name}_y.npy", labels[idx])
        mean, std = stats.mean_std()
        t = cache.target
        _write_meta(tmp, folder.classes, mean, std, (t.channels, t.size, t.size))
    print(
        f"prepare: {len(folder.files)} images: {decoded} decoded, "
        f"{len(folder.files) - decoded} from the cache, {len(bad)} skipped",
        file=sys.stderr,
    )
    result = summary(load(out, mmap=True))
    result["skipped"] = bad
    result["ignored"] = [name(f) for f in folder.ignored]
    return result


def _write_images(path: Path, keys: list[str], cache: Cache, stats: ChannelStats | None) -> None:
    """A (N, C, H, W) uint8 `.npy` written image by image from the cache: plain writes, so the
    pages go to the file, not to this process's memory."""
    t = cache.target
    header = {
        "descr": "|u1",
        "fortran_order": False,
        "shape": (len(keys), t.channels, t.size, t.size),
    }
    with path.open("wb") as f, progress.bar(len(keys), f"write {path.stem}", "img") as bar:
        np.lib.format.write_array_header_1_0(f, header)
        for key in keys:
            x = cache.read(key)
            if stats is not None:
                stats.add(x)
            f.write(x.tobytes())
            bar.update()
