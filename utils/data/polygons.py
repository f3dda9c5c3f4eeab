"""Instance outlines (polygons) for segmentation: resampling, boxes, warps and rasterisation into masks.

Coordinates are continuous pixels: pixel (i, j) covers [i, i + 1) x [j, j + 1), the convention of the boxes, so a
polygon and its box line up exactly. Masks at 1/ratio of the image size sample the polygons at the mask pixels'
centres: cv2.fillPoly (sub-pixel precision) draws each polygon on the image grid and the mask keeps the pixel under
each mask pixel's centre. OpenCV fills every pixel its rounded edges touch, half a pixel of the grid it draws on too
many on each side; drawing the coarse grid itself would fatten every instance by half a mask pixel (2 px at ratio 4)
all round, the image grid keeps that to half an image pixel, as YOLOv5's full-size fill and resize does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import cv2
import numpy as np

SEGMENT_POINTS = 1000  # points every outline is resampled to before it is warped (YOLOv5's count)
_SHIFT = 4  # fractional bits of the fixed-point coordinates given to cv2.fillPoly
_FAR = 1e7  # points are clamped to +-_FAR px so fixed-point coordinates stay inside int32
# polygon_has_area's exact even-odd area, where the shoelace sum cancels, for outlines up to this many points whose
# slabs x edges (the work, see _slabs) stay under EXACT_AREA_WORK: well under a second each
EXACT_AREA_POINTS, EXACT_AREA_WORK = 2048, 1 << 24


def polygon_area(xy: np.ndarray) -> float:
    """Unsigned area of a closed (k, 2) polygon (shoelace formula)."""
    x, y = np.asarray(xy, np.float64).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _edge_crossings_x(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """x of every point where two edges a -> b ((k, 2) each) meet, their shared corners included."""
    d, out = b - a, [np.zeros(0)]
    for i in range(0, len(a), chunk):
        ai, di = a[i:i + chunk, None], d[i:i + chunk, None]  # (c, 1, 2) against all (k, 2)
        r = a[None] - ai
        den = di[..., 0] * d[:, 1] - di[..., 1] * d[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (r[..., 0] * d[:, 1] - r[..., 1] * d[:, 0]) / den
            u = (r[..., 0] * di[..., 1] - r[..., 1] * di[..., 0]) / den
            hit = (den != 0) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
            out.append((ai[..., 0] + t * di[..., 0])[hit])
    return np.concatenate(out)


def _covered_lengths(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Even-odd covered length along each vertical line x (m,) of the non-vertical edges a -> b ((e, 2) each); a line
    through no corner crosses an even number of edges."""
    lo, hi = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    span = (lo < x[:, None]) & (x[:, None] < hi)
    y = a[:, 1] + (x[:, None] - a[:, 0]) / (b[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    y = np.sort(np.where(span, y, np.inf), 1)
    if y.shape[1] % 2:
        y = np.concatenate((y, np.full((len(x), 1), np.inf)), 1)
    with np.errstate(invalid="ignore"):
        gaps = y[:, 1::2] - y[:, 0::2]  # inside from each odd crossing to the next; inf - inf (no more edges): NaN
    return np.where(np.isfinite(gaps), gaps, 0.0).sum(1)


def _slabs(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted x of the corners and crossings, starts, ends of the non-vertical edges) of a closed (k, 2) polygon."""
    a = np.asarray(xy, np.float64).reshape(-1, 2)
    b = np.roll(a, -1, 0)
    xs = np.unique(np.concatenate((a[:, 0], _edge_crossings_x(a, b))))
    sloped = a[:, 0] != b[:, 0]  # vertical edges bound no slab
    return xs, a[sloped], b[sloped]


def _slab_areas(xs: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 256) -> Iterator[float]:
    """The even-odd area between the edges a -> b, chunk by chunk of the vertical slabs between consecutive xs (see
    _slabs): no two edges cross inside a slab, so the covered length is linear in x there and its value at the slab's
    middle times the slab's width is exactly the slab's area."""
    for s in range(0, len(xs) - 1, chunk):
        edges = xs[s:s + chunk + 1]
        yield float(np.dot(_covered_lengths(a, b, (edges[:-1] + edges[1:]) / 2), np.diff(edges)))


def even_odd_area(xy: np.ndarray) -> float:
    """Area a closed (k, 2) polygon covers under the even-odd rule, the one cv2.fillPoly fills (and so the masks);
    exact for self-intersecting outlines too, whose shoelace sum cancels (a symmetric bow-tie's is 0). Slow for long
    outlines with many crossings: polygon_has_area uses it only where the shoelace formula cannot decide."""
    return sum(_slab_areas(*_slabs(xy)))


def polygon_has_area(xy: np.ndarray, min_area: float) -> bool:
    """True when a closed (k, 2) outline covers more than min_area: its shoelace area, or, where that sum cancels (a
    bow-tie's two lobes), its even-odd area (what the masks are filled with), summed only until it is enough.

    An outline too long or too tangled for the exact area (EXACT_AREA_POINTS, EXACT_AREA_WORK) is kept unless all its
    points are collinear."""
    p = np.asarray(xy, np.float64).reshape(-1, 2)
    if polygon_area(p) > min_area:
        return True
    if len(p) <= EXACT_AREA_POINTS:
        xs, a, b = _slabs(p)
        if len(xs) * len(a) <= EXACT_AREA_WORK:
            total = 0.0
            for part in _slab_areas(xs, a, b):
                total += part
                if total > min_area:
                    return True
            return False
    r = p - p[0]
    return float(np.abs(r[:-1, 0] * r[1:, 1] - r[:-1, 1] * r[1:, 0]).sum()) / 2 > min_area


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
