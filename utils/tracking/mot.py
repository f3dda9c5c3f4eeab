"""MOTChallenge text files (tracker results and ground truth) and CLEAR-MOT / identity metrics over them.

A results row is `frame,id,x,y,w,h,conf,-1,-1,-1` (frame 1-based, x, y the top-left corner, w, h in pixels); a
ground-truth row `frame,id,x,y,w,h,flag,class,visibility`. Both read back as float arrays with those columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

from utils.tracking.matching import iou_matrix

METRICS = ("mota", "motp", "idf1", "idp", "idr", "precision", "recall", "num_switches", "num_fragmentations",
           "num_false_positives", "num_misses", "num_objects", "num_predictions", "num_unique_objects",
           "mostly_tracked", "partially_tracked", "mostly_lost")  # fmt: skip


def _rows(a: np.ndarray, k: int) -> np.ndarray:
    """a as a 2-D float array, (0, k) when empty."""
    a = np.asarray(a, np.float64)
    return np.zeros((0, k)) if a.size == 0 else np.atleast_2d(a)


def mot_lines(frame: int, tracks: np.ndarray) -> list[str]:
    """MOTChallenge result lines for one frame (1-based) of ByteTracker.update output rows [x1, y1, x2, y2, id, conf, ...]."""
    t = _rows(tracks, 6)
    return [f"{frame},{int(r[4])},{r[0]:.2f},{r[1]:.2f},{r[2] - r[0]:.2f},{r[3] - r[1]:.2f},{r[5]:.4f},-1,-1,-1" for r in t]


def write_mot(path: Union[str, Path], lines: Iterable[str]) -> None:
    """Append lines to a MOTChallenge text file (created with its folder when missing), one frame's at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in lines)


def read_mot(path: Union[str, Path]) -> np.ndarray:
    """A MOTChallenge text file as an (n, k) float array (k = its column count, 10 for an empty file)."""
    rows = [ln.split(",") for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not rows:
        return np.zeros((0, 10))
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: rows with different column counts")
    return np.array(rows, np.float64)


def _distances(gt: np.ndarray, hyp: np.ndarray, iou_thresh: float) -> np.ndarray:
    """1 - IoU between gt and hyp [x, y, w, h] boxes, NaN (not a possible match) where IoU < iou_thresh."""

    def xyxy(b: np.ndarray) -> np.ndarray:
        return np.concatenate((b[:, :2], b[:, :2] + b[:, 2:4]), 1)

    d = 1.0 - iou_matrix(xyxy(gt), xyxy(hyp))
    d[d > 1.0 - iou_thresh] = np.nan
    return d


def mot_metrics(gt: np.ndarray, hyp: np.ndarray, iou_thresh: float = 0.5) -> dict[str, float]:
    """MOTA, IDF1, ID switches and the other CLEAR-MOT / identity metrics of hyp against gt, with py-motmetrics.

    gt and hyp are MOTChallenge arrays (read_mot): columns frame, id, x, y, w, h; every row counts. A pair can match
    when its IoU is at least iou_thresh. The IoU distances are ours (motmetrics.distances calls np.asfarray, removed
    in numpy 2). Returns {metric name: value} for the names in METRICS; ratios are NaN when undefined (no ground truth)."""
    try:
        import motmetrics as mm
    except ImportError as e:
        raise ImportError("mot_metrics needs py-motmetrics: pip install motmetrics") from e
    gt, hyp = _rows(gt, 6), _rows(hyp, 6)
    acc = mm.MOTAccumulator(auto_id=False)
    for frame in np.union1d(gt[:, 0], hyp[:, 0]).astype(int):
        g, h = gt[gt[:, 0] == frame], hyp[hyp[:, 0] == frame]
        acc.update(g[:, 1].astype(int).tolist(), h[:, 1].astype(int).tolist(), _distances(g[:, 2:6], h[:, 2:6], iou_thresh),
                   frameid=int(frame))  # fmt: skip
    summary: Any = mm.metrics.create().compute(acc, metrics=list(METRICS), name="all")
    return {k: float(summary[k].iloc[0]) for k in METRICS}
