"""Deterministic synthetic detection dataset (coloured shapes on cluttered backgrounds) used as the offline default.

With polygons=True the same images get segmentation labels: each shape's exact outline (circles as a 32-vertex
polygon, rectangles and triangles their vertices) in continuous pixel coordinates, pixel i covering [i, i + 1).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import cv2
import numpy as np

LOGGER = logging.getLogger("mobile_yolo")
SHAPE_NAMES = ("circle", "rectangle", "triangle")
BACKGROUND_FRACTION = 0.06  # share of images with no objects (empty label files)
SIDES = (96, 192)  # image height/width range of the embedded dataset, pixels
CIRCLE_VERTICES = 32


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: class, pixel box [x1, y1, x2, y2] (clipped to the image) and (k, 2) pixel outline."""

    cls: int
    box: np.ndarray
    polygon: np.ndarray

    def label_line(self, h: int, w: int, polygon: bool = False) -> str:
        """YOLO label line, normalised with 6 decimals: `cls cx cy w h`, or `cls x1 y1 ... xn yn` for the outline."""
        if polygon:
            xy = self.polygon.clip(0, [w, h]) / [w, h]
            return f"{self.cls} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in xy)
        b = self.box
        cx, cy, bw_n, bh_n = (b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h, (b[2] - b[0]) / w, (b[3] - b[1]) / h
        return f"{self.cls} {cx:.6f} {cy:.6f} {bw_n:.6f} {bh_n:.6f}"


def _hsv_colour(rng: np.random.Generator, s: tuple[int, int], v: tuple[int, int]) -> tuple[int, int, int]:
    """A BGR colour with random hue and saturation/value in the given ranges."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(*s), rng.integers(*v)]]], dtype=np.uint8)
    b, g, r = (int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
    return b, g, r


def draw_background(rng: np.random.Generator, h: int, w: int, noise: float = 8.0) -> np.ndarray:
    """Dull background with lines and soft blobs that are not objects, plus Gaussian pixel noise of std `noise`."""
    img: np.ndarray = np.empty((h, w, 3), np.uint8)
    img[:] = _hsv_colour(rng, (0, 60), (40, 120))
    for _ in range(int(rng.integers(2, 7))):  # thin clutter lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p1, p2, _hsv_colour(rng, (0, 70), (20, 150)), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 4))):  # low-contrast blurred blobs
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(8, w // 3)), int(rng.integers(8, h // 3)))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, _hsv_colour(rng, (0, 60), (30, 130)), -1)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    return np.clip(img.astype(np.float32) + rng.normal(0.0, noise, img.shape), 0, 255).astype(np.uint8)


def _shape_points(rng: np.random.Generator, cls: int, x1: int, y1: int, size_w: int, size_h: int) -> np.ndarray:
    """Polygon vertices of a rectangle (cls 1) or triangle (cls 2) inside the given box."""
    if cls == 1:
        return np.array([[x1, y1], [x1 + size_w, y1], [x1 + size_w, y1 + size_h], [x1, y1 + size_h]], np.int32)
    apex = x1 + int(rng.integers(0, size_w + 1))
    pts = [[apex, y1], [x1 + size_w, y1 + size_h], [x1, y1 + size_h]]
    if rng.random() < 0.5:  # upside-down variant
        pts = [[apex, y1 + size_h], [x1 + size_w, y1], [x1, y1]]
    return np.array(pts, np.int32)


def draw_shape(img: np.ndarray, rng: np.random.Generator, cls: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one filled shape in a saturated colour; returns its exact pixel box [x1, y1, x2, y2] and (k, 2) outline.

    OpenCV draws with pixel centres on integers: the circle's outline is centred half a pixel further with half a pixel
    more radius (its box is then exactly the one returned), a rectangle's is its box, a triangle's its vertices moved
    to their pixel centres."""
    x1, y1, bw, bh = box
    colour = _hsv_colour(rng, (170, 256), (170, 256))
    if cls == 0:
        r = min(bw, bh) // 2
        centre = (x1 + r, y1 + r)
        cv2.circle(img, centre, r, colour, -1, cv2.LINE_AA)
        a = np.linspace(0, 2 * np.pi, CIRCLE_VERTICES, endpoint=False)
        outline = np.stack((np.cos(a), np.sin(a)), 1) * (r + 0.5) + (centre[0] + 0.5, centre[1] + 0.5)
        return np.array([x1, y1, x1 + 2 * r + 1, y1 + 2 * r + 1], np.float64), outline
    pts = _shape_points(rng, cls, x1, y1, bw, bh)
    cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    b = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1], np.float64)
    outline = b[[0, 1, 2, 1, 2, 3, 0, 3]].reshape(4, 2) if cls == 1 else pts.astype(np.float64) + 0.5
    return b, outline


def _overlaps(box: np.ndarray, boxes: list[np.ndarray], thr: float = 0.2) -> bool:
    """True if box covers more than thr of its own area with any placed box."""
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw > 0 and ih > 0 and iw * ih > thr * min((box[2] - box[0]) * (box[3] - box[1]), (b[2] - b[0]) * (b[3] - b[1])):
            return True
    return False


def draw_scene(rng: np.random.Generator, h: int, w: int, nc: int, n_objects: int | None = None, min_object: int = 14,
               max_fraction: float = 0.45, noise: float = 8.0, polygons: bool = False) -> tuple[np.ndarray, list[str]]:
    """Draw an h x w cluttered background and shapes that barely overlap (_overlaps); returns (BGR image, YOLO label lines).

    Public so that other scenes (the sample images in data/images/) come from the generator the detector trained on.
    n_objects None draws the count as the embedded dataset does (a background image now and then, else 1-6); a given
    count is attempted, and fewer are placed when the 4 x n_objects placement attempts run out. Object sides are drawn
    from [min_object, max_fraction x the short side); `noise` is the background's pixel-noise standard deviation.
    polygons: outline lines `cls x1 y1 ... xn yn` instead of box lines (same random draws, same image).
    """
    img, objects = draw_scene_objects(rng, h, w, nc, n_objects, min_object, max_fraction, noise)
    return img, [o.label_line(h, w, polygons) for o in objects]


def draw_scene_objects(rng: np.random.Generator, h: int, w: int, nc: int, n_objects: int | None = None, min_object: int = 14,
                       max_fraction: float = 0.45, noise: float = 8.0) -> tuple[np.ndarray, list[SceneObject]]:
    """draw_scene's image and its shapes as SceneObject (class, pixel box, pixel outline)."""
    img = draw_background(rng, h, w, noise)
    if n_objects is None:
        n_objects = 0 if rng.random() < BACKGROUND_FRACTION else int(rng.integers(1, 7))
    boxes: list[np.ndarray] = []
    objects = []
    for _ in range(n_objects * 4):  # placement attempts
        if len(boxes) == n_objects:
            break
        size = int(rng.integers(min_object, max(min_object + 1, int(max_fraction * min(h, w)))))
        bw, bh = (size, size) if rng.random() < 0.5 else (size, int(size * rng.uniform(0.6, 1.6)))
        bw, bh = min(bw, w - 2), min(bh, h - 2)
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        if _overlaps(np.array([x1, y1, x1 + bw, y1 + bh], np.float64), boxes):
            continue
        cls = int(rng.integers(0, nc))
        b, outline = draw_shape(img, rng, cls, (x1, y1, bw, bh))
        boxes.append(b)
        objects.append(SceneObject(cls, b.clip(0, [w, h, w, h]), outline))
    return img, objects


def _make_image(rng: np.random.Generator, nc: int, sides: tuple[int, int] = SIDES, polygons: bool = False) -> tuple[np.ndarray, list[str]]:
    """One image (height and width drawn from `sides`, inclusive) and its YOLO label lines (outlines when polygons)."""
    h, w = int(rng.integers(sides[0], sides[1] + 1)), int(rng.integers(sides[0], sides[1] + 1))
    return draw_scene(rng, h, w, nc, polygons=polygons)


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator, nc: int, sides: tuple[int, int], polygons: bool) -> None:
    """Write n images and label files for one split."""
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        img, lines = _make_image(rng, nc, sides, polygons)
        name = f"{split}_{i:05d}"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {name}")
        (root / "images" / split / f"{name}.jpg").write_bytes(buf.tobytes())
        (root / "labels" / split / f"{name}.txt").write_text("".join(f"{ln}\n" for ln in lines))


def generate_shapes(root: Union[str, Path], n_train: int = 256, n_val: int = 64, seed: int = 0,
                    names: Sequence[str] = SHAPE_NAMES, sides: tuple[int, int] = SIDES, polygons: bool = False) -> Path:
    """Create the shapes dataset at root (images/{train,val}, labels/{train,val}); built in a temp dir then renamed.

    `sides` bounds image heights and widths: the default keeps the embedded dataset small; benchmarks ask for
    photo-sized images so that decoding costs what it does on real data. polygons: segmentation labels (each shape's
    outline) for the very same images.
    """
    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        _write_split(tmp, "train", n_train, rng, len(names), sides, polygons)
        _write_split(tmp, "val", n_val, rng, len(names), sides, polygons)

    kind = "segmentation dataset" if polygons else "dataset"
    return build_in_place(Path(root), ("images/train", "images/val"), write, f"shapes {kind}",
                          f"{n_train} train, {n_val} val images, {len(names)} classes")


def build_in_place(root: Path, splits: Sequence[str], write: Callable[[Path], None], what: str, detail: str) -> Path:
    """Run write(tmp) in a sibling temp folder, then rename it to root, so an interrupted run never leaves a dataset that
    looks complete. A root holding every split folder is kept as it is; any other non-empty root is refused."""
    root = root.resolve()
    if all((root / s).is_dir() for s in splits):
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists but is not a complete {what}; delete it to regenerate")
    t0 = time.time()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if root.exists():
            root.rmdir()  # empty directory left by someone else
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info(f"Generated {what} ({detail}) at {root} in {time.time() - t0:.1f}s")
    return root
