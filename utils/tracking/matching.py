"""Association costs and the thresholded assignment that the tracker solves each frame."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou_matrix(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """(n, m) intersection over union of every box in a (n, 4) with every box in b (m, 4), both [x1, y1, x2, y2]."""
    a = np.asarray(a_xyxy, np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def fuse_score(cost: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """IoU cost (1 - IoU, tracks x detections) weighted by detection confidence: 1 - IoU * score.

    A confident detection then costs less than a doubtful one at the same overlap (ByteTrack's fuse_score)."""
    cost = np.asarray(cost, np.float64)
    if cost.size == 0:
        return cost
    return 1.0 - (1.0 - cost) * np.asarray(scores, np.float64)[None, :]


def linear_assignment(cost: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match rows to columns of a cost matrix, no pair costing more than thresh.

    The matching minimises the sum of (cost - thresh) over its pairs: leaving a row and a column unmatched costs thresh
    per would-be pair, so every kept pair beats that, and a cheap pair is never traded for an over-threshold one.
    Returns (matches (k, 2) int [row, col], unmatched rows, unmatched columns), each sorted by row / column.
    """
    cost = np.asarray(cost, np.float64)
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.empty((0, 2), np.int64), np.arange(n), np.arange(m)
    gain = np.minimum(cost - thresh, 0.0)  # pairs over the threshold gain nothing: as good as unmatched
    rows, cols = linear_sum_assignment(gain)
    keep = cost[rows, cols] <= thresh
    matches = np.stack((rows[keep], cols[keep]), 1).astype(np.int64)
    unmatched_a = np.setdiff1d(np.arange(n), matches[:, 0])
    unmatched_b = np.setdiff1d(np.arange(m), matches[:, 1])
    return matches, unmatched_a, unmatched_b
