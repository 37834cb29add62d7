"""The fit verdict: underfitting, good fit or overfitting, read off the per-epoch curves.

The rules, in the order they apply (the thresholds are the constants below):
1. underfitting: the last epoch's training accuracy is below `UNDERFIT_ACC` (without
   accuracies: training loss fell by less than `FLAT_DROP` of its first value). A network that
   cannot fit the data it sees has to learn more before anything else matters.
2. overfitting, with a turn: after the epoch of lowest validation loss, validation loss ends
   (the mean of up to `TAIL` last epochs) at least `TURN_RISE` above that minimum, relatively,
   and `TURN_MIN_RISE` absolutely, while training loss kept falling. The turning epoch is the
   epoch of the minimum.
3. overfitting, without a turn: the last epoch's training accuracy exceeds validation accuracy
   by more than `GAP_ACC`.
4. good fit otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["underfitting", "good fit", "overfitting"]

UNDERFIT_ACC = 0.80
FLAT_DROP = 0.10
TURN_RISE = 0.10
TURN_MIN_RISE = 0.02
"""Nats: on a small validation split a loss near zero moves by more than 10% by chance."""
TAIL = 3
GAP_ACC = 0.10


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    reason: str
    """One sentence with the numbers behind the kind."""
    best_epoch: int
    """The epoch of the lowest validation loss."""
    turn_epoch: int | None = None
    """The epoch after which validation loss rose while training loss fell (overfitting)."""


def fit_verdict(rows: list[dict[str, Any]]) -> Verdict:
    """The verdict on per-epoch rows (`epoch`, `train_loss`, `val_loss`, optionally
    `train_acc`, `val_acc`); ValueError when no row has both losses.

    >>> rows = [
    ...     {"epoch": e, "train_loss": 1 / e, "val_loss": 0.5 + abs(e - 3) / 4, "train_acc": 0.99}
    ...     for e in range(1, 9)
    ... ]
    >>> v = fit_verdict(rows); v.kind, v.turn_epoch
    ('overfitting', 3)
    """
    scored = [r for r in rows if r.get("train_loss") is not None and r.get("val_loss") is not None]
    if not scored:
        raise ValueError("no epoch has both a training and a validation loss")
    first, last = scored[0], scored[-1]
    best = min(scored, key=lambda r: r["val_loss"])
    epoch = int(best["epoch"])
    underfit = _underfit(first, last)
    if underfit:
        return Verdict("underfitting", underfit, epoch)
    turned = _turn(scored, best)
    if turned:
        return Verdict("overfitting", turned, epoch, turn_epoch=epoch)
    gap = _accuracy_gap(last)
    if gap is not None and gap > GAP_ACC:
        return Verdict(
            "overfitting",
            f"training accuracy {last['train_acc']:.3f} exceeds validation accuracy "
            f"{last['val_acc']:.3f} by {gap:.3f} (more than {GAP_ACC:g}) at the last epoch",
            epoch,
        )
    return Verdict(
        "good fit",
        f"validation loss reached its lowest, {best['val_loss']:.4g}, at epoch {epoch} and "
        f"ended at {last['val_loss']:.4g}; training accuracy {_acc(last, 'train')}, "
        f"validation accuracy {_acc(last, 'val')} at the last epoch",
        epoch,
    )


def _underfit(first: dict[str, Any], last: dict[str, Any]) -> str | None:
    if last.get("train_acc") is not None:
        if last["train_acc"] < UNDERFIT_ACC:
            return (
                f"training accuracy is {last['train_acc']:.3f} at the last epoch, below "
                f"{UNDERFIT_ACC:g}: the network does not fit even the data it trains on"
            )
        return None
    drop = 1 - last["train_loss"] / first["train_loss"] if first["train_loss"] > 0 else 0.0
    if drop < FLAT_DROP:
        return (
            f"training loss fell by {drop:.0%} ({first['train_loss']:.4g} to "
            f"{last['train_loss']:.4g}), less than {FLAT_DROP:.0%}: it is flat"
        )
    return None


def _turn(scored: list[dict[str, Any]], best: dict[str, Any]) -> str | None:
    after = scored[scored.index(best) + 1 :]
    if not after:
        return None
    tail = after[-TAIL:]
    end = sum(r["val_loss"] for r in tail) / len(tail)
    rise = end - best["val_loss"]
    falling = after[-1]["train_loss"] < best["train_loss"]
    if not falling or rise < max(TURN_RISE * best["val_loss"], TURN_MIN_RISE):
        return None
    # A lowest loss of 0 (the curves keep 6 decimals) has no relative rise.
    relative = f" (+{rise / best['val_loss']:.0%})" if best["val_loss"] > 0 else ""
    return (
        f"validation loss turned after epoch {int(best['epoch'])}: from its lowest, "
        f"{best['val_loss']:.4g}, it rose to {end:.4g}{relative} over "
        f"the last {len(tail)} epoch(s) while training loss kept falling, "
        f"{best['train_loss']:.4g} to {after[-1]['train_loss']:.4g}"
    )


def _accuracy_gap(row: dict[str, Any]) -> float | None:
    if row.get("train_acc") is None or row.get("val_acc") is None:
        return None
    return float(row["train_acc"]) - float(row["val_acc"])


def _acc(row: dict[str, Any], split: str) -> str:
    value = row.get(f"{split}_acc")
    return "unknown" if value is None else f"{value:.3f}"
