"""Curve smoothing shared by the metrics (best-F1 confidence) and the plots (smoothed class-mean curves)."""

from __future__ import annotations

import numpy as np


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter a curve over a window of about f of its length (YOLOv5's: 101 of 1000 points at f=0.1), padding with its
    end values."""
    half = (round(2 * f * len(y)) // 2 + 1) // 2  # YOLOv5's window is round(2fL)//2 + 1 points: the same, made odd
    nf = 2 * half + 1  # odd window keeps the output length equal to the input's
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")
