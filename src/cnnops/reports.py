"""Reports shared by stages: JSON metrics, CSV curves, and their plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all (a killed stage never leaves half a metrics file)."""
    from cnnops.runs import write_bytes

    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _save(fig: Any, path: Path) -> None:
    """Lay out, write as a 100-dpi PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train against validation: the under/overfitting picture."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{metric}") for r in rows]
            ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training curves")
    _save(fig, path)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def per_class(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros_like(tp), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, cm.sum(axis=1), out=np.zeros_like(tp), where=cm.sum(axis=1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, cm.sum(axis=1), strict=True)
    }


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    size = max(5, len(classes) * 0.6)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = cm.max() / 2
    for i, j in np.ndindex(cm.shape):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if cm[i, j] > threshold else "black",
        )
    _save(fig, path)


def plot_image_grid(rows: list[list[np.ndarray]], path: Path, title: str = "") -> None:
    """uint8 (C, H, W) images in a grid, one row per list; the first column labelled original."""
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(cols * 1.1, len(rows) * 1.1 + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            hwc = image.transpose(1, 2, 0)
            gray = hwc.shape[2] == 1
            axes[r][c].imshow(
                hwc[:, :, 0] if gray else hwc,
                cmap="gray" if gray else None,
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
    axes[0][0].set_title("original", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


STUDY_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


def plot_study(study: Any, folder: Path) -> None:
    """Optuna's study plots as PNG (matplotlib) and HTML (plotly if installed, else PNG inline)."""
    import warnings

    import optuna.visualization.matplotlib as views

    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    for name in STUDY_PLOTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
            try:
                fig = getattr(views, f"plot_{name}")(study).figure
            except (ValueError, RuntimeError) as e:  # e.g. importances need two complete trials
                fig, ax = plt.subplots(figsize=(6, 2))
                ax.text(0.5, 0.5, f"{name}: {e}", ha="center", va="center", wrap=True)
                ax.axis("off")
        fig.set_size_inches(10, 6)
        _save(fig, folder / f"{name}.png")
        _study_html(study, name, folder)


def _study_html(study: Any, name: str, folder: Path) -> None:
    import base64

    path = folder / f"{name}.html"
    try:
        import optuna.visualization as views
        import plotly  # noqa: F401  # optional: interactive pages when installed

        # The whole plotly.js goes inline: the page must open offline.
        getattr(views, f"plot_{name}")(study).write_html(path, include_plotlyjs=True)
        return
    except (ImportError, ValueError, RuntimeError):
        pass
    png = base64.b64encode((folder / f"{name}.png").read_bytes()).decode()
    path.write_text(
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{name}</title>"
        f"</head><body><h1>{study.study_name}: {name.replace('_', ' ')}</h1>"
        f"<img src='data:image/png;base64,{png}' alt='{name}'></body></html>\n"
    )


def plot_misclassified(
    x: np.ndarray,
    y: np.ndarray,
    y_pred: np.ndarray,
    classes: list[str],
    path: Path,
    limit: int = 36,
) -> None:
    """A grid of wrongly classified images (uint8 N, C, H, W), titled `actual → predicted`."""
    plt = _pyplot()
    n = min(len(x), limit)
    cols = max(1, min(6, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        image = x[k].transpose(1, 2, 0)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(f"{classes[y[k]]} → {classes[y_pred[k]]}", fontsize=8)
    fig.suptitle(f"misclassified: {len(x)}" + (f" (first {n})" if n < len(x) else ""))
    _save(fig, path)


def png_data_uri(path: Path, scale: float = 1.0) -> str | None:
    """`path` as a `data:image/png;base64,...` URI (the picture travels inside the text that
    shows it), redrawn at `scale` of its size when below 1 to keep that text short; None when
    the file is missing or is not a PNG."""
    import base64
    import io

    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    if scale < 1.0:
        from matplotlib import image

        _pyplot()  # the Agg backend
        stream = io.BytesIO()
        image.thumbnail(io.BytesIO(data), stream, scale=scale)
        data = stream.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def plot_fit(
    rows: list[dict[str, Any]], path: Path, marks: dict[str, int], title: str = ""
) -> None:
    """Loss (log scale) and accuracy per epoch with the train/validation gap shaded, red where
    validation is worse, and a vertical line at each of `marks` (label → epoch)."""
    plt = _pyplot()
    with plt.style.context("default"):  # not the style an Optuna plot left behind
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric in zip(axes, ("loss", "acc"), strict=True):
            _fit_panel(ax, rows, metric, marks)
        fig.suptitle(title or "training curves")
        _save(fig, path)


def _fit_panel(ax: Any, rows: list[dict[str, Any]], metric: str, marks: dict[str, int]) -> None:
    from matplotlib.ticker import MaxNLocator

    epochs = np.array([r["epoch"] for r in rows], dtype=float)
    # dtype float: a missing value (None) is drawn as a gap (nan)
    train, val = (np.array([r.get(f"{s}_{metric}") for r in rows], float) for s in ("train", "val"))
    worse = val > train if metric == "loss" else val < train
    ax.fill_between(epochs, train, val, where=worse, color="tab:red", alpha=0.18, label="gap")
    ax.fill_between(epochs, train, val, where=~worse, color="tab:green", alpha=0.12)
    ax.plot(epochs, train, "-o", color="tab:blue", markersize=3, label="train")
    ax.plot(epochs, val, "-s", color="tab:orange", markersize=3, label="validation")
    for (label, epoch), style in zip(marks.items(), ("--", ":", "-."), strict=False):
        ax.axvline(epoch, color="0.35", linestyle=style, linewidth=1, label=label)
    if metric == "loss":
        ax.set_yscale("log", nonpositive="mask")  # a turn near zero loss stays visible
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_study_view(study: Any, name: str, path: Path) -> None:
    """One of Optuna's `STUDY_PLOTS` of `study` as a PNG; Optuna's ValueError or RuntimeError
    when it cannot draw it (importances need two complete trials)."""
    import warnings

    import optuna.visualization.matplotlib as views
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    # Optuna switches the whole process to its ggplot style: the context takes it back after.
    with plt.style.context("default"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        ax = getattr(views, f"plot_{name}")(study)
        if name == "optimization_history":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
        # One axis per lever side by side: they need the width.
        ax.figure.set_size_inches(14 if name == "parallel_coordinate" else 10, 5)
        _save(ax.figure, path)
