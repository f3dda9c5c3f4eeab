"""YOLO label files: locating them from image paths and reading them with validation and repair."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from utils.boxes import xywh2xyxy, xyxy2xywh

# Coordinates outside [0, 1] by no more than this are rounding noise and clipped silently.
CLIP_TOLERANCE = 1e-3
STATUSES = ("ok", "background", "repaired", "corrupt")


def img2label_paths(img_paths: Sequence[Union[str, Path]]) -> list[str]:
    """Map .../images/.../x.jpg -> .../labels/.../x.txt (last '/images/' in the path), the YOLOv5 rule."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in img_paths:
        p = str(p)
        i = p.rfind(sa)
        q = p[:i] + sb + p[i + len(sa):] if i >= 0 else p
        out.append(os.path.splitext(q)[0] + ".txt")
    return out


def _parse_rows(text: str) -> np.ndarray:
    """Parse label text into an (n, 5) float array; polygon rows (cls x1 y1 x2 y2 ...) become boxes."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        vals = [float(v) for v in parts]  # ValueError on non-numeric text
        if len(vals) == 5:
            rows.append(vals)
        elif len(vals) >= 7 and len(vals) % 2 == 1:  # segment polygon -> enclosing box
            xy = np.array(vals[1:], dtype=np.float64).reshape(-1, 2)
            x1, y1 = xy.min(0)
            x2, y2 = xy.max(0)
            rows.append([vals[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        else:
            raise ValueError(f"{len(vals)} columns, expected 5 (cls cx cy w h)")
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _clean_classes(lb: np.ndarray, nc: int | None, notes: list[str]) -> np.ndarray:
    """Drop rows whose class id is negative, non-integer or >= nc."""
    cls = lb[:, 0]
    bad = (cls < 0) | (cls != np.round(cls))
    if nc is not None:
        bad |= cls >= nc
    if bad.any():
        ids = sorted({float(c) for c in cls[bad]})
        notes.append(f"dropped {int(bad.sum())} rows with invalid class {ids}" + (f" (nc={nc})" if nc is not None else ""))
    return lb[~bad]


def _clean_boxes(lb: np.ndarray, notes: list[str]) -> np.ndarray:
    """Clip boxes to the unit square and drop degenerate ones."""
    xyxy = xywh2xyxy(lb[:, 1:5])
    out_by = np.maximum(-xyxy, xyxy - 1).max(initial=0.0)
    if out_by > CLIP_TOLERANCE:
        notes.append(f"clipped coordinates out of [0, 1] (by up to {out_by:.3g})")
    lb = lb.copy()
    lb[:, 1:5] = xyxy2xywh(xyxy.clip(0.0, 1.0))
    tiny = (lb[:, 3] <= 0) | (lb[:, 4] <= 0)
    if tiny.any():
        notes.append(f"dropped {int(tiny.sum())} zero-area boxes")
    return lb[~tiny]


def _dedupe(lb: np.ndarray, notes: list[str]) -> np.ndarray:
    """Remove exact duplicate rows, keeping first occurrences in order."""
    _, idx = np.unique(lb, axis=0, return_index=True)
    if len(idx) < len(lb):
        notes.append(f"removed {len(lb) - len(idx)} duplicate rows")
        lb = lb[np.sort(idx)]
    return lb


def read_label_file(path: Union[str, Path], nc: int | None = None) -> tuple[np.ndarray, str | None, str]:
    """Read a YOLO label file -> (float32 (n,5) [cls cx cy w h], one-line note or None, status in STATUSES)."""
    path = Path(path)
    empty = np.zeros((0, 5), dtype=np.float32)
    if not path.is_file():
        if path.exists():  # a folder (or fifo, device) where the label file should be: not a background image
            kind = "a directory" if path.is_dir() else "not a regular file"
            return empty, f"{path}: corrupt label file ignored (the label path is {kind})", "corrupt"
        return empty, None, "background"
    try:
        lb = _parse_rows(path.read_text(encoding="utf-8", errors="strict"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        return empty, f"{path}: corrupt label file ignored ({str(e).splitlines()[0] if str(e) else type(e).__name__})", "corrupt"
    if not np.isfinite(lb).all():
        return empty, f"{path}: corrupt label file ignored (NaN or infinite values)", "corrupt"
    if len(lb) == 0:
        return empty, None, "background"
    notes: list[str] = []
    lb = _dedupe(_clean_boxes(_clean_classes(lb, nc, notes), notes), notes)
    if notes:
        return lb.astype(np.float32), f"{path}: " + "; ".join(notes), "repaired"
    return lb.astype(np.float32), None, "ok"
