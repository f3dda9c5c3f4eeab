"""results.csv in YOLOv5's column layout, one row per epoch, appended as training goes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from utils.files import atomic_write_text

LOGGER = logging.getLogger("mobile_yolo")

YOLOV5_LOSSES = ("box_loss", "obj_loss", "cls_loss")
YOLOV5_SEG_LOSSES = ("box_loss", "seg_loss", "obj_loss", "cls_loss")
BOX_METRICS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")  # a detector's (its task's)


def columns(loss_names: Sequence[str] = YOLOV5_LOSSES, metrics: Sequence[str] = BOX_METRICS) -> tuple[str, ...]:
    """The csv columns for a loss with these item names and a task with these metric columns (Task.metric_columns):
    YOLOv5's layout, whatever the losses and metrics."""
    return ("epoch", *(f"train/{n}" for n in loss_names), *metrics, *(f"val/{n}" for n in loss_names), "x/lr0", "x/lr1", "x/lr2")


COLUMNS = columns()


def append_results(
    csv: Path, epoch: int, train_loss: Sequence[float], results: Sequence[float], lrs: Sequence[float],
    loss_names: Sequence[str] = YOLOV5_LOSSES, metrics: Sequence[str] = BOX_METRICS,
) -> None:
    """Append one epoch (train losses, the task's metrics, val losses, 3 learning rates); writes the header first."""
    values = [epoch, *train_loss, *results, *lrs]
    cols = columns(loss_names, metrics)
    if len(values) != len(cols):
        raise ValueError(f"results row has {len(values)} values, expected {len(cols)}")
    new = not csv.exists()
    with csv.open("a") as f:
        if new:
            f.write(_header(cols) + "\n")
        f.write(",".join(f"{v:>20.5g}" if i else f"{int(v):>20}" for i, v in enumerate(values)) + "\n")


def truncate_results(csv: Path, last_epoch: int, loss_names: Sequence[str] = YOLOV5_LOSSES, metrics: Sequence[str] = BOX_METRICS) -> None:
    """Keep the header and the rows up to `last_epoch` (a resumed run rewrites the epoch in progress); atomic rewrite.

    Rows that do not start with an epoch number (a torn write, a stray edit) are dropped with a warning, so a damaged
    results.csv never stops a resume whose checkpoint is fine.
    """
    if not csv.exists():
        return
    rows = [ln for ln in csv.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    cols = columns(loss_names, metrics)
    epochs = [_row_epoch(ln, len(cols)) for ln in rows]
    damaged = sum(e is None for e in epochs) - int(bool(rows) and rows[0].lstrip().startswith("epoch"))
    if damaged:
        LOGGER.warning(f"WARNING: {csv}: dropped {damaged} unreadable row(s) while preparing to resume")
    kept = [ln for ln, e in zip(rows, epochs) if e is not None and e <= last_epoch]
    atomic_write_text(csv, "".join(ln + "\n" for ln in [_header(cols), *kept]))


def _header(cols: Sequence[str]) -> str:
    """The header row: the column names, right-aligned to 20 characters."""
    return ",".join(f"{c:>20}" for c in cols)


def _row_epoch(line: str, n_columns: int) -> int | None:
    """The epoch number a results row starts with, or None for a header, blank or damaged row."""
    parts = line.split(",")
    if len(parts) != n_columns:
        return None
    try:
        return int(parts[0])
    except ValueError:
        return None
