"""Instance outlines (polygons) for segmentation: resampling, boxes, warps and rasterisation into masks.

Coordinates are continuous pixels: pixel (i, j) covers [i, i + 1) x [j, j + 1), the convention of the boxes, so a
polygon and its box line up exactly. Masks at 1/ratio of the image size sample the polygons at the mask pixels'
centres: cv2.fillPoly (sub-pixel precision) draws each polygon on the image grid and the mask keeps the pixel under
each mask pixel's centre. OpenCV fills every pixel its rounded edges touch, half a pixel of the grid it draws on too
many on each side; drawing the coarse grid itself would fatten every instance by half a mask pixel (2 px at ratio 4)
all round, the image grid keeps that to half an image pixel, as YOLOv5's full-size fill and resize does.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

SEGMENT_POINTS = 1000  # points every outline is resampled to before it is warped (YOLOv5's count)
_SHIFT = 4  # fractional bits of the fixed-point coordinates given to cv2.fillPoly
_FAR = 1e7  # points are clamped to +-_FAR px so fixed-point coordinates stay inside int32


def polygon_area(xy: np.ndarray) -> float:
    """Unsigned area of a closed (k, 2) polygon (shoelace formula)."""
    x, y = np.asarray(xy, np.float64).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def resample_polygon(xy: np.ndarray, n: int = SEGMENT_POINTS) -> np.ndarray:
    """(k, 2) closed outline -> (n, 2) points evenly spaced along it, starting at its first vertex."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    closed = np.concatenate((xy, xy[:1]), 0)
    cum = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))))
    if cum[-1] <= 0:  # a single point repeated
        return np.repeat(xy[:1], n, 0)
    t = np.linspace(0.0, cum[-1], n, endpoint=False)
    return np.stack((np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])), 1)


def box_polygon(xyxy: np.ndarray) -> np.ndarray:
    """(4,) box x1 y1 x2 y2 -> (4, 2) rectangle outline, clockwise from the top-left corner."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)


def polygons_to_boxes(points: np.ndarray, w: float, h: float) -> np.ndarray:
    """(n, k, 2) outlines -> (n, 4) xyxy boxes of their points inside the w x h image (zeros where none is inside)."""
    points = np.asarray(points, np.float64)
    x, y = points[..., 0], points[..., 1]
    inside = (x >= 0) & (y >= 0) & (x <= w) & (y <= h)
    boxes = np.stack((np.where(inside, x, np.inf).min(1), np.where(inside, y, np.inf).min(1),
                      np.where(inside, x, -np.inf).max(1), np.where(inside, y, -np.inf).max(1)), 1)
    boxes[~inside.any(1)] = 0.0
    return boxes


def polygon_to_box(xy: np.ndarray, w: float, h: float) -> np.ndarray:
    """(k, 2) outline -> (4,) xyxy box of its points inside the w x h image (zeros when none is inside)."""
    return polygons_to_boxes(np.asarray(xy)[None], w, h)[0]


def warp_points(points: np.ndarray, M: np.ndarray, perspective: bool) -> np.ndarray:
    """Points (..., 2) mapped by the 3x3 matrix M (divided by w when perspective)."""
    pts = np.asarray(points, np.float64)
    out = pts @ M[:2, :2].T + M[:2, 2]
    if perspective:
        out /= (pts @ M[2, :2] + M[2, 2])[..., None]
    return out


def warp_polygons(polygons: Sequence[np.ndarray], M: np.ndarray, perspective: bool) -> list[np.ndarray]:
    """Each (k, 2) polygon mapped by the 3x3 matrix M (see warp_points)."""
    return [warp_points(p, M, perspective) for p in polygons]


def _fill(canvas: np.ndarray, xy: np.ndarray, offset: float) -> None:
    """Paint one polygon (continuous pixels, shifted by -offset into OpenCV's integer pixel centres) with sub-pixel precision."""
    pts = np.clip(np.asarray(xy, np.float64).reshape(-1, 2) - offset, -_FAR, _FAR)
    fixed = np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=_SHIFT)


def polygons_to_masks(polygons: Sequence[np.ndarray], hw: tuple[int, int], ratio: int = 1) -> np.ndarray:
    """Pixel polygons of an H x W image -> (n, H // ratio, W // ratio) uint8 binary masks (see the module docstring)."""
    h, w = hw[0] // ratio, hw[1] // ratio
    masks = np.zeros((len(polygons), h, w), np.uint8)
    canvas = np.zeros((h * ratio, w * ratio), np.uint8)
    first = ratio // 2  # the image pixel at (or, ratio even, just past) each mask-pixel centre
    offset = ratio / 2 - first  # moves mask-pixel centres onto those image pixels' centres
    for mask, xy in zip(masks, polygons):
        canvas[:] = 0
        _fill(canvas, xy, offset)
        mask[:] = canvas[first::ratio, first::ratio]
    return masks


def polygons_to_index_mask(polygons: Sequence[np.ndarray], hw: tuple[int, int], ratio: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel polygons -> (index mask (H // ratio, W // ratio), order): value k + 1 marks polygon order[k], 0 background."""
    # larger instances are painted first so that smaller ones stay visible on top; uint8, int32 past 255 instances
    masks = polygons_to_masks(polygons, hw, ratio)
    order = np.argsort(-masks.sum((1, 2), dtype=np.int64), kind="stable")
    index = np.zeros(masks.shape[1:], np.uint8 if len(polygons) < 256 else np.int32)
    for k, i in enumerate(order):
        index[masks[i] > 0] = k + 1
    return index, order
