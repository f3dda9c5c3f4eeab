"""Curve smoothing shared by the metrics (best-F1 confidence) and the plots (smoothed class-mean curves)."""

from __future__ import annotations

import numpy as np


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter a curve over a window of about 2*f of its length, padding with its end values."""
    half = round(len(y) * f)
    nf = 2 * half + 1  # odd window keeps the output length equal to the input's
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")
