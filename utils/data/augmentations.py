"""Training-time image augmentations with box bookkeeping (HSV jitter, affine/perspective warp, mixup, flips).

Label rows are [cls x1 y1 x2 y2] (pixels) or [cls cx cy w h] (normalised). A row may carry its instance's outline
after the box as points x y x y ... (segmentation): the geometric steps move the points with the box, and where
points are present the box is recomputed from the points inside the output (polygon_to_box), as YOLOv5 does.

Randomness comes from `rng` (a numpy Generator or the np.random module, the default); data-loader workers
re-seed np.random per worker so augmentations are reproducible for a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from utils.data.polygons import polygons_to_boxes, warp_points

Rng = Any  # np.random.Generator or the np.random module: both offer uniform(), random() and beta()


def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5, rng: Rng | None = None) -> None:
    """Randomly scale hue, saturation and value of a BGR uint8 image in place (colour robustness)."""
    if not (hgain or sgain or vgain):
        return
    rng = np.random if rng is None else rng
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV hue range is 0-179
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100, area_thr: float = 0.1,
                   eps: float = 1e-16) -> np.ndarray:
    """Keep warped boxes (box2, 4xn xyxy) that stay > wh_thr px, keep > area_thr of their area and aspect < ar_thr."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def outline_points(labels: np.ndarray) -> np.ndarray:
    """The (n, k, 2) outline points that label rows carry after their box (k = 0 for plain box rows)."""
    return labels[:, 5:].reshape(len(labels), (labels.shape[1] - 5) // 2, 2)


def _warp_matrix(h: int, w: int, out_h: int, out_w: int, degrees: float, translate: float, scale: float, shear: float,
                 perspective: float, rng: Rng) -> tuple[np.ndarray, float]:
    """Compose centre -> perspective -> rotate/scale -> shear -> translate into one 3x3 matrix; returns (M, scale)."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -w / 2, -h / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective), rng.uniform(-perspective, perspective)
    s = rng.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D(angle=rng.uniform(-degrees, degrees), center=(0, 0), scale=s)
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    sh[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    tr = np.eye(3)
    tr[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    tr[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    return tr @ sh @ rot @ persp @ centre, s


def _warp_boxes(boxes: np.ndarray, M: np.ndarray, perspective: bool, out_h: int, out_w: int) -> np.ndarray:
    """Transform xyxy boxes by their four corners and take the enclosing, clipped box."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    corners = corners @ M.T
    xy = corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]
    xy = xy.reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), axis=1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_w)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_h)
    return new


@dataclass(frozen=True)
class Warp:
    """One random affine/perspective transform from an input canvas to an (out_h, out_w) image."""

    matrix: np.ndarray  # 3x3, input pixel -> output pixel
    scale: float  # the random zoom, used to judge how much of a box survived
    out_h: int
    out_w: int
    perspective: bool

    @classmethod
    def draw(cls, in_hw: tuple[int, int], border: tuple[int, int], degrees: float, translate: float, scale: float,
             shear: float, perspective: float, rng: Rng | None = None) -> Warp:
        """Draw the transform (the same random draws, in the same order, whatever the image content)."""
        rng = np.random if rng is None else rng
        out_h, out_w = in_hw[0] + 2 * border[0], in_hw[1] + 2 * border[1]
        M, s = _warp_matrix(in_hw[0], in_hw[1], out_h, out_w, degrees, translate, scale, shear, perspective, rng)
        return cls(M, s, out_h, out_w, bool(perspective))

    def is_identity(self, in_hw: tuple[int, int]) -> bool:
        """True when the output would be the input unchanged (no crop, no motion)."""
        return (self.out_h, self.out_w) == in_hw and bool(np.allclose(self.matrix, np.eye(3)))

    def source_region(self, in_hw: tuple[int, int], margin: int = 2) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) of the input that the output samples, with `margin` px for interpolation; may be empty."""
        corners = np.array([[0, 0, 1], [self.out_w, 0, 1], [0, self.out_h, 1], [self.out_w, self.out_h, 1]], dtype=np.float64)
        src = corners @ np.linalg.inv(self.matrix).T
        w = src[:, 2:3]
        if self.perspective and (w <= 0).any():  # the horizon is in view: the whole input may be sampled
            return 0, 0, in_hw[1], in_hw[0]
        xy = src[:, :2] / w
        x1, y1 = (math.floor(v) - margin for v in xy.min(0))
        x2, y2 = (math.ceil(v) + margin for v in xy.max(0))
        return max(x1, 0), max(y1, 0), min(x2, in_hw[1]), min(y2, in_hw[0])

    def on_pixel_grid(self, in_hw: tuple[int, int]) -> tuple[Warp, tuple[int, int, int, int]] | None:
        """For a pure zoom and shift (no rotation, shear or perspective): the all but identical warp that resizes an
        integer crop (x1, y1, x2, y2; it may reach past the input) to the output, so cv2.resize, about 3x cheaper than
        warpAffine, can draw it; None for other warps or zooms so far out that the crop would be huge."""
        M = self.matrix
        if self.perspective or M[0, 1] != 0 or M[1, 0] != 0 or M[0, 0] <= 0 or M[1, 1] <= 0:
            return None
        cw, ch = max(1, round(self.out_w / M[0, 0])), max(1, round(self.out_h / M[1, 1]))
        if cw > 2 * in_hw[1] or ch > 2 * in_hw[0]:
            return None
        fx, fy = self.out_w / cw, self.out_h / ch
        x1 = round(-M[0, 2] / M[0, 0] + 0.5 - 0.5 / fx)  # where this warp samples output pixel 0
        y1 = round(-M[1, 2] / M[1, 1] + 0.5 - 0.5 / fy)
        # cv2.resize samples output pixel X at crop pixel (X + 0.5) / f - 0.5, i.e. X = f * (x - x1 + 0.5) - 0.5
        snapped = np.array([[fx, 0, fx * (0.5 - x1) - 0.5], [0, fy, fy * (0.5 - y1) - 0.5], [0, 0, 1]], dtype=np.float64)
        return Warp(snapped, self.scale, self.out_h, self.out_w, False), (x1, y1, x1 + cw, y1 + ch)

    def apply_image(self, img: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Warp `img`, which is the part of the input canvas whose top-left corner sits at `origin` (x, y)."""
        M = self.matrix
        if origin != (0, 0):
            M = M @ np.array([[1, 0, origin[0]], [0, 1, origin[1]], [0, 0, 1]], dtype=np.float64)
        size, fill = (self.out_w, self.out_h), (114, 114, 114)
        if self.perspective:
            return cv2.warpPerspective(img, M, dsize=size, borderValue=fill)
        return cv2.warpAffine(img, M[:2], dsize=size, borderValue=fill)

    def apply_labels(self, labels: np.ndarray) -> np.ndarray:
        """Warp (n, 5) [cls x1 y1 x2 y2] pixel labels (and any outline points after the box); drop boxes that became
        too small, thin or mostly cropped."""
        if not len(labels):
            return labels
        if labels.shape[1] > 5:
            labels = labels.copy()
            points = warp_points(outline_points(labels), self.matrix, self.perspective)
            labels[:, 5:] = points.reshape(len(labels), -1)
            new = polygons_to_boxes(points, self.out_w, self.out_h)
        else:
            new = _warp_boxes(labels[:, 1:5], self.matrix, self.perspective, self.out_h, self.out_w)
        keep = box_candidates(labels[:, 1:5].T * self.scale, new.T, area_thr=0.10)
        labels = labels[keep]
        labels[:, 1:5] = new[keep]
        return labels


def keep_visible_boxes(labels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Clip (n, 5) [cls x1 y1 x2 y2] labels, already in output pixels, to the output (rows with outline points: box of
    the points inside it); drop those left too small or thin."""
    before = labels[:, 1:5].T.copy()
    if labels.shape[1] > 5:
        labels[:, 1:5] = polygons_to_boxes(outline_points(labels), out_w, out_h)
    else:
        labels[:, [1, 3]] = labels[:, [1, 3]].clip(0, out_w)
        labels[:, [2, 4]] = labels[:, [2, 4]].clip(0, out_h)
    return labels[box_candidates(before, labels[:, 1:5].T, area_thr=0.10)]


def random_perspective(img: np.ndarray, targets: npt.ArrayLike = (), degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0, border: tuple[int, int] = (0, 0),
                       rng: Rng | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random affine/perspective warp; targets are (n, 5) [cls x1 y1 x2 y2] pixels (outline points may follow the box);
    border < 0 crops (mosaic)."""
    labels = np.asarray(targets, dtype=np.float32)
    labels = labels.reshape(-1, labels.shape[1] if labels.ndim == 2 else 5)
    in_hw = (img.shape[0], img.shape[1])
    warp = Warp.draw(in_hw, border, degrees, translate, scale, shear, perspective, rng)
    if not warp.is_identity(in_hw):
        img = warp.apply_image(img)
    return img, warp.apply_labels(labels)


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray,
          rng: Rng | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) ratio and keep both label sets (mixup augmentation)."""
    rng = np.random if rng is None else rng
    r = rng.beta(32.0, 32.0)
    blended = (im.astype(np.float32) * r + im2.astype(np.float32) * (1 - r)).round().astype(np.uint8)
    return blended, np.concatenate((labels, labels2), 0)


def flip_labels(labels: np.ndarray, lr: bool) -> np.ndarray:
    """Mirror normalised [cls cx cy w h] labels (and normalised outline points after them) left-right (lr) or up-down,
    in place; returns them."""
    col = 1 if lr else 2
    if len(labels):
        labels[:, col] = 1 - labels[:, col]
        labels[:, col + 4::2] = 1 - labels[:, col + 4::2]  # outline x (5, 7, ...) or y (6, 8, ...) columns
    return labels
