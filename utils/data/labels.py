"""YOLO label files: locating them from image paths and reading them with validation and repair.

Detection (read_label_file): rows `cls cx cy w h`; a polygon row counts as its enclosing box; any malformed row makes
the file corrupt. Segmentation (read_segment_label_file): rows `cls x1 y1 ... xn yn` (>= 3 points, normalised) keep
their polygon, box rows beside them become rectangles; a malformed row (odd coordinate count, under 3 points, NaN or
infinite values) is skipped rather than spoiling the file. Both note every repair in one line per file. Files are
UTF-8; a leading byte-order mark (Windows editors write one) is skipped.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from utils.boxes import xywh2xyxy, xyxy2xywh
from utils.data.polygons import box_polygon, polygon_has_area

# Coordinates outside [0, 1] by no more than this are rounding noise and clipped silently.
CLIP_TOLERANCE = 1e-3
STATUSES = ("ok", "background", "repaired", "corrupt")
MIN_POLYGON_AREA = 1e-12  # normalised area at or under which an outline is degenerate (collinear points; a bow-tie counts its lobes)


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


def _bad_classes(cls: np.ndarray, nc: int | None, notes: list[str]) -> np.ndarray:
    """Mask of class ids that are negative, non-integer or >= nc (noted)."""
    bad = (cls < 0) | (cls != np.round(cls))
    if nc is not None:
        bad |= cls >= nc
    if bad.any():
        ids = sorted({float(c) for c in cls[bad]})
        notes.append(f"dropped {int(bad.sum())} rows with invalid class {ids}" + (f" (nc={nc})" if nc is not None else ""))
    return bad


def _clean_classes(lb: np.ndarray, nc: int | None, notes: list[str]) -> np.ndarray:
    """Drop rows whose class id is negative, non-integer or >= nc."""
    return lb[~_bad_classes(lb[:, 0], nc, notes)]


def _note_clip(out_by: float, notes: list[str]) -> None:
    """Note coordinates beyond [0, 1] by more than CLIP_TOLERANCE (less is rounding noise, clipped silently)."""
    if out_by > CLIP_TOLERANCE:
        notes.append(f"clipped coordinates out of [0, 1] (by up to {out_by:.3g})")


def _clean_boxes(lb: np.ndarray, notes: list[str]) -> np.ndarray:
    """Clip boxes to the unit square and drop degenerate ones."""
    xyxy = xywh2xyxy(lb[:, 1:5])
    _note_clip(np.maximum(-xyxy, xyxy - 1).max(initial=0.0), notes)
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


def _corrupt_note(path: Path, reason: str) -> str:
    """The one-line note of a label file ignored as corrupt."""
    return f"{path}: corrupt label file ignored ({reason})"


def _error_reason(e: Exception) -> str:
    """First line of an exception's message, or its type name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _label_text(path: Path) -> tuple[str | None, str | None, str]:
    """(text, None, "ok") of a label file, or (None, note or None, status) when it is missing or unreadable."""
    if not path.is_file():
        if path.exists():  # a folder (or fifo, device) where the label file should be: not a background image
            kind = "a directory" if path.is_dir() else "not a regular file"
            return None, _corrupt_note(path, f"the label path is {kind}"), "corrupt"
        return None, None, "background"
    try:
        return path.read_text(encoding="utf-8-sig", errors="strict"), None, "ok"  # -sig: a leading BOM is not text
    except (UnicodeDecodeError, OSError) as e:
        return None, _corrupt_note(path, _error_reason(e)), "corrupt"


def _finish(path: Path, notes: list[str]) -> tuple[str | None, str]:
    """(one-line note, status) of a parsed file from its repair notes."""
    return (f"{path}: " + "; ".join(notes), "repaired") if notes else (None, "ok")


def read_label_file(path: Union[str, Path], nc: int | None = None) -> tuple[np.ndarray, str | None, str]:
    """Read a YOLO label file -> (float32 (n,5) [cls cx cy w h], one-line note or None, status in STATUSES)."""
    path = Path(path)
    empty = np.zeros((0, 5), dtype=np.float32)
    text, note, status = _label_text(path)
    if text is None:
        return empty, note, status
    try:
        lb = _parse_rows(text)
    except ValueError as e:
        return empty, _corrupt_note(path, _error_reason(e)), "corrupt"
    if not np.isfinite(lb).all():
        return empty, _corrupt_note(path, "NaN or infinite values"), "corrupt"
    if len(lb) == 0:
        return empty, None, "background"
    notes: list[str] = []
    lb = _dedupe(_clean_boxes(_clean_classes(lb, nc, notes), notes), notes)
    note, status = _finish(path, notes)
    return lb.astype(np.float32), note, status


def _split_rows(text: str) -> list[np.ndarray]:
    """The numeric rows of label text (ValueError on non-numeric text)."""
    return [np.array([float(v) for v in parts], np.float64) for line in text.splitlines() if (parts := line.split())]


def _row_polygon(row: np.ndarray) -> tuple[np.ndarray | None, str]:
    """One row -> ((k, 2) normalised outline, kind "box" or "polygon"), or (None, why the row is skipped)."""
    if len(row) == 5:
        xy = box_polygon(xywh2xyxy(row[1:5]))
        kind = "box"
    elif (len(row) - 1) % 2:
        return None, "with an odd number of coordinates"
    elif len(row) < 7:
        return None, "with fewer than 3 points"
    else:
        xy, kind = row[1:].reshape(-1, 2), "polygon"
    return (xy, kind) if np.isfinite(row).all() else (None, "with NaN or infinite values")


def _parse_polygons(rows: list[np.ndarray], notes: list[str]) -> tuple[np.ndarray, list[np.ndarray], bool]:
    """Rows -> (classes, (k, 2) outlines, whether any row is a polygon); malformed rows skipped and noted per reason."""
    classes: list[float] = []
    polygons: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    has_polygons = False
    for row in rows:
        xy, kind = _row_polygon(row)
        if xy is None:
            skipped[kind] += 1
            continue
        classes.append(float(row[0]))
        polygons.append(xy)
        has_polygons |= kind == "polygon"
    notes += [f"skipped {n} rows {why}" for why, n in skipped.items()]
    return np.array(classes, np.float64), polygons, has_polygons


def _keep(cls: np.ndarray, polygons: list[np.ndarray], keep: Union[Sequence[bool], np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rows (classes and outlines) where keep is true."""
    mask = np.asarray(keep, bool).reshape(-1)
    return cls[mask], [p for p, k in zip(polygons, mask) if k]


def _clean_polygons(cls: np.ndarray, polygons: list[np.ndarray], nc: int | None, notes: list[str],
                    kind: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Drop invalid classes, clip points to the unit square, drop zero-area outlines and exact duplicate rows."""
    cls, polygons = _keep(cls, polygons, ~_bad_classes(cls, nc, notes))
    _note_clip(max((float(np.maximum(-p, p - 1).max()) for p in polygons), default=0.0), notes)
    polygons = [p.clip(0.0, 1.0) for p in polygons]
    solid = [polygon_has_area(p, MIN_POLYGON_AREA) for p in polygons]
    if not all(solid):
        notes.append(f"dropped {solid.count(False)} zero-area {kind}")
    cls, polygons = _keep(cls, polygons, solid)
    keys = [(float(c), p.tobytes()) for c, p in zip(cls, polygons)]
    first_at: dict[tuple[float, bytes], int] = {}
    for i, k in enumerate(keys):
        first_at.setdefault(k, i)
    first = [first_at[k] == i for i, k in enumerate(keys)]
    if not all(first):
        notes.append(f"removed {first.count(False)} duplicate rows")
    return _keep(cls, polygons, first)


def read_segment_label_file(path: Union[str, Path], nc: int | None = None
                            ) -> tuple[np.ndarray, list[np.ndarray], str | None, str]:
    """Read a YOLO segmentation label file -> (float32 (n,5) [cls cx cy w h] boxes of the outlines, float32 (k,2)
    normalised outlines aligned with them ([] when the file has no polygon row), one-line note or None, status)."""
    path = Path(path)
    empty = np.zeros((0, 5), dtype=np.float32)
    text, note, status = _label_text(path)
    if text is None:
        return empty, [], note, status
    try:
        rows = _split_rows(text)
    except ValueError as e:
        return empty, [], _corrupt_note(path, _error_reason(e)), "corrupt"
    if not rows:
        return empty, [], None, "background"
    notes: list[str] = []
    cls, polygons, has_polygons = _parse_polygons(rows, notes)
    cls, polygons = _clean_polygons(cls, polygons, nc, notes, "polygons" if has_polygons else "boxes")
    boxes = np.array([[*p.min(0), *p.max(0)] for p in polygons], np.float64).reshape(-1, 4)
    labels = np.concatenate((cls[:, None], xyxy2xywh(boxes)), 1).astype(np.float32)
    note, status = _finish(path, notes)
    return labels, [p.astype(np.float32) for p in polygons] if has_polygons else [], note, status
