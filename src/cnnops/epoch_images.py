"""Per-epoch pictures on MLflow's image slider: the validation confusion matrix and a grid of
misclassified validation images, both from one prediction pass over a fixed validation subset.

Drawn with Pillow (milliseconds; matplotlib takes a second a figure) and sent by the tracker's
own thread, so an epoch waits only for the subset's forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    from PIL import Image

    from cnnops.tracking import Tracker

SUBSET = 512  # validation images predicted per epoch, spread evenly over the split
GRID = 4  # misclassified images shown: GRID x GRID, the first ones of the subset
TILE = 100  # pixels a side of each image in the grid
BLUE = np.array([33, 113, 181])  # a fully correct row of the confusion matrix


class EpochImages(Callback):
    """`val/confusion_matrix` and `val/misclassified` of each epoch, logged at the step of that
    epoch's metrics (rank 0 only; nothing without a run to log to).

    Drawn when validation ends (the model in eval mode), sent when the epoch ends: after the
    epoch's metrics (`Curves`), so the pictures never hold the numbers back on the tracker's
    thread, and an epoch that never ends (a pruned trial) has neither."""

    def __init__(self, tracker: Tracker, subset: int = SUBSET) -> None:
        self.tracker, self.subset = tracker, subset
        self.sample: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        self.drawn: dict[str, Image.Image] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.tracker.run_id is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.sample is None:
            self.sample = fixed_subset(trainer, self.subset)
        x, y, classes = self.sample
        if not len(y):
            return
        pred = predict(trainer, module, x)
        cm = np.bincount(y * len(classes) + pred, minlength=len(classes) ** 2)
        self.drawn = {
            "val/confusion_matrix": draw_confusion(cm.reshape(len(classes), -1), classes),
            "val/misclassified": draw_misclassified(x, y, pred, classes),
        }

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for key, image in self.drawn.items():
            self.tracker.log_image(key, image, step=trainer.current_epoch + 1)
        self.drawn = {}


def fixed_subset(trainer: L.Trainer, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Up to `size` validation images at a fixed stride (a split may be ordered by class)."""
    data = getattr(trainer.datamodule, "prepared", None)  # type: ignore[attr-defined]
    if data is None:
        return np.empty((0, 1, 1, 1), np.uint8), np.empty(0, np.int64), []
    n = len(data.y["val"])
    idx = np.arange(0, n, max(1, -(-n // size)))
    return np.asarray(data.x["val"][idx]), np.asarray(data.y["val"][idx]), list(data.classes)


def predict(trainer: L.Trainer, module: L.LightningModule, x: np.ndarray) -> np.ndarray:
    """Predicted classes of uint8 images, in the precision validation ran in."""
    out = []
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for start in range(0, len(x), 128):  # memory bounded for a large network at 224 px
            batch = torch.from_numpy(x[start : start + 128]).to(module.device)
            out.append(module(batch).argmax(1).cpu())
    return torch.cat(out).numpy()


def _font(size: int = 12) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_confusion(cm: np.ndarray, classes: list[str]) -> Image.Image:
    """Rows: the true class; columns: the predicted one. Cells shaded by the row's share."""
    from PIL import Image, ImageDraw

    k, font = len(classes), _font()
    cell = int(np.clip(480 // k, 12, 40))
    left, top = 90, 40
    image = Image.new("RGB", (left + k * cell + 10, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"true (rows) vs predicted (columns), {cm.sum()} images", "black", font)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fits = all(len(c) * 7 <= cell for c in classes)  # else the columns are numbered
    for i in range(k):
        row, column = (classes[i], classes[i]) if fits else (f"{i} {classes[i][:10]}", str(i))
        draw.text((4, top + i * cell + cell // 2), row, "black", font, anchor="lm")
        draw.text((left + i * cell + cell // 2, top - 4), column, "black", font, anchor="mb")
        for j in range(k):
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            colour = np.rint(255 - share[i, j] * (255 - BLUE)).astype(int)
            draw.rectangle(box, tuple(colour), "#d0d0d0")
            if cell >= 18 and cm[i, j]:
                ink = "white" if share[i, j] > 0.5 else "black"
                centre = (box[0] + cell // 2, box[1] + cell // 2)
                draw.text(centre, str(cm[i, j]), ink, font, anchor="mm")
    return image


def draw_misclassified(
    x: np.ndarray, y: np.ndarray, pred: np.ndarray, classes: list[str]
) -> Image.Image:
    """The first GRID x GRID wrongly classified images, each captioned `true as predicted`."""
    from PIL import Image, ImageDraw

    wrong = np.flatnonzero(pred != y)
    font, caption, top = _font(), 16, 24
    image = Image.new("RGB", (GRID * TILE, top + GRID * (TILE + caption)), "white")
    draw = ImageDraw.Draw(image)
    shown = min(len(wrong), GRID * GRID)
    title = f"misclassified: {len(wrong)} of {len(y)}, true as predicted (first {shown})"
    draw.text((4, 4), title, "black", font)
    for n, i in enumerate(wrong[:shown]):
        row, col = divmod(n, GRID)
        pixels = x[i].transpose(1, 2, 0)
        tile = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
        origin = (col * TILE, top + row * (TILE + caption))
        sharp = tile.width < TILE  # small images upscaled as blocks, large ones smoothed down
        resample = Image.Resampling.NEAREST if sharp else Image.Resampling.BILINEAR
        image.paste(tile.resize((TILE - 4, TILE - 4), resample), origin)
        text = f"{classes[y[i]][:5]} as {classes[pred[i]][:5]}"  # Pillow's font has no arrow
        draw.text((origin[0] + TILE // 2, origin[1] + TILE), text, "black", font, anchor="mt")
    return image
