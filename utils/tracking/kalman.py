"""Constant-velocity Kalman filter on a box state, as ByteTrack uses it: pure numpy, one track or many at once.

The state is (cx, cy, a, h, vcx, vcy, va, vh): box centre, aspect ratio a = w / h, height, and their velocities per
frame. The measurement is (cx, cy, a, h). Position and velocity noise scale with the box height (a box twice as tall
moves twice as many pixels for the same motion in the scene); the aspect ratio gets a small fixed noise.
"""

from __future__ import annotations

import numpy as np

STD_POSITION = 1.0 / 20  # position noise standard deviation, as a fraction of the box height
STD_VELOCITY = 1.0 / 160  # velocity noise standard deviation, as a fraction of the box height
NDIM = 4

MOTION = np.eye(2 * NDIM)
MOTION[:NDIM, NDIM:] = np.eye(NDIM)  # x' = x + v, one frame per step
OBSERVE = np.eye(NDIM, 2 * NDIM)  # the measurement is the first half of the state


def _diag_sq(std: np.ndarray) -> np.ndarray:
    """Covariance matrices diag(std**2) for std of shape (..., k)."""
    return np.eye(std.shape[-1]) * (std**2)[..., None, :]


def initiate(measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (8,), covariance (8, 8)) of a new track from one (cx, cy, a, h) measurement, at zero velocity."""
    z = np.asarray(measurement, np.float64)
    h = z[3]
    mean = np.concatenate((z, np.zeros(NDIM)))
    std = np.array([2 * STD_POSITION * h, 2 * STD_POSITION * h, 1e-2, 2 * STD_POSITION * h,
                    10 * STD_VELOCITY * h, 10 * STD_VELOCITY * h, 1e-5, 10 * STD_VELOCITY * h])  # fmt: skip
    return mean, _diag_sq(std)


def _process_noise(h: np.ndarray) -> np.ndarray:
    """Process noise covariances (..., 8, 8) for box heights h of shape (...)."""
    p, v = STD_POSITION * h, STD_VELOCITY * h
    std = np.stack((p, p, np.full_like(h, 1e-2), p, v, v, np.full_like(h, 1e-5), v), -1)
    return _diag_sq(std)


def multi_predict(means: np.ndarray, covs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One prediction step for n tracks at once: means (n, 8), covs (n, 8, 8) -> the predicted (means, covs)."""
    means, covs = np.asarray(means, np.float64), np.asarray(covs, np.float64)
    q = _process_noise(means[..., 3])
    return means @ MOTION.T, MOTION @ covs @ MOTION.T + q


def predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One prediction step for one track: mean (8,), cov (8, 8) -> the predicted (mean, cov)."""
    m, c = multi_predict(np.asarray(mean)[None], np.asarray(cov)[None])
    return m[0], c[0]


def project(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The state distribution in measurement space, measurement noise included: (mean (4,), cov (4, 4))."""
    h = mean[3]
    r = _diag_sq(np.array([STD_POSITION * h, STD_POSITION * h, 1e-1, STD_POSITION * h]))
    return OBSERVE @ mean, OBSERVE @ cov @ OBSERVE.T + r


def update(mean: np.ndarray, cov: np.ndarray, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct one track's (mean, cov) with a (cx, cy, a, h) measurement; returns the posterior (mean, cov)."""
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    z_mean, s = project(mean, cov)
    # Kalman gain K = P H^T S^-1, solved rather than inverted (S is symmetric positive definite)
    gain = np.linalg.solve(s, OBSERVE @ cov).T
    innovation = np.asarray(measurement, np.float64) - z_mean
    return mean + gain @ innovation, cov - gain @ s @ gain.T


def xyah_from_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) [x1, y1, x2, y2] -> (n, 4) [cx, cy, w / h, h]."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, w / np.maximum(h, 1e-9), h), 1)


def xyxy_from_xyah(xyah: np.ndarray) -> np.ndarray:
    """(n, >=4) [cx, cy, a, h, ...] -> (n, 4) [x1, y1, x2, y2]."""
    s = np.asarray(xyah, np.float64).reshape(-1, np.shape(xyah)[-1])
    w, h = s[:, 2] * s[:, 3], s[:, 3]
    return np.stack((s[:, 0] - w / 2, s[:, 1] - h / 2, s[:, 0] + w / 2, s[:, 1] + h / 2), 1)
