"""results.csv in YOLOv5's column layout, one row per epoch, appended as training goes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

COLUMNS = (
    "epoch",
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
    "val/box_loss",
    "val/obj_loss",
    "val/cls_loss",
    "x/lr0",
    "x/lr1",
    "x/lr2",
)


def append_results(csv: Path, epoch: int, train_loss: Sequence[float], results: Sequence[float], lrs: Sequence[float]) -> None:
    """Append one epoch (train losses, P, R, mAP50, mAP50-95, val losses, 3 learning rates); writes the header first."""
    values = [epoch, *train_loss, *results, *lrs]
    if len(values) != len(COLUMNS):
        raise ValueError(f"results row has {len(values)} values, expected {len(COLUMNS)}")
    new = not csv.exists()
    with csv.open("a") as f:
        if new:
            f.write(",".join(f"{c:>20}" for c in COLUMNS) + "\n")
        f.write(",".join(f"{v:>20.5g}" if i else f"{int(v):>20}" for i, v in enumerate(values)) + "\n")


def truncate_results(csv: Path, last_epoch: int) -> None:
    """Drop rows after `last_epoch` (a resumed run rewrites the epoch that was in progress)."""
    if not csv.exists():
        return
    lines = csv.read_text().splitlines()
    kept = lines[:1] + [ln for ln in lines[1:] if ln.strip() and int(ln.split(",")[0]) <= last_epoch]
    csv.write_text("".join(ln + "\n" for ln in kept))
