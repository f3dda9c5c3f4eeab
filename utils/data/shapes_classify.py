"""Deterministic synthetic classification dataset: one dominant shape per image, stored in ImageFolder class folders.

The images reuse the detection generator's drawing (utils.data.shapes_dataset): its cluttered backgrounds, and a few
small shapes of any class as distractors, so the label is the large shape's kind and not simply "which colour blob".
Layout: <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg, classes named after the shapes they show.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np

from utils.data.shapes_dataset import SHAPE_NAMES, build_in_place, draw_background, draw_shape
from utils.files import safe_component

LOGGER = logging.getLogger("mobile_yolo")
CLS_SIDES = (96, 128)  # square image side range, pixels
DOMINANT_FRACTION = (0.3, 0.75)  # side of the labelled shape, as a fraction of the image side
MAX_DISTRACTORS = 3  # small shapes of random classes drawn before the labelled one (0 to 3 of them)


def draw_classify_image(rng: np.random.Generator, cls: int, side: int) -> np.ndarray:
    """A side x side BGR image whose largest shape is of class cls (0 circle, 1 rectangle, 2 triangle)."""
    img = draw_background(rng, side, side, noise=float(rng.uniform(4.0, 14.0)))
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        s = int(rng.integers(8, max(9, side // 6)))
        x, y = (int(v) for v in rng.integers(0, side - s, 2))
        draw_shape(img, rng, int(rng.integers(0, len(SHAPE_NAMES))), (x, y, s, s))
    size = int(rng.integers(int(DOMINANT_FRACTION[0] * side), int(DOMINANT_FRACTION[1] * side) + 1))
    bw, bh = size, (size if rng.random() < 0.5 else int(size * rng.uniform(0.6, 1.6)))
    bw, bh = min(bw, side - 2), min(bh, side - 2)
    x1, y1 = int(rng.integers(0, side - bw)), int(rng.integers(0, side - bh))
    draw_shape(img, rng, cls, (x1, y1, bw, bh))
    return img


def _check_names(names: Sequence[str]) -> list[str]:
    """Class names usable as folder names, one per drawable shape; ValueError otherwise."""
    names = [str(n) for n in names]
    if not 1 <= len(names) <= len(SHAPE_NAMES):
        raise ValueError(f"the shapes-cls generator draws 1 to {len(SHAPE_NAMES)} classes ({', '.join(SHAPE_NAMES)}), "
                         f"got {len(names)} names")
    bad = [n for n in names if safe_component(n) != n]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct plain folder names, got {names}")
    return names


def _write_split(folder: Path, n_per_class: int, rng: np.random.Generator, names: list[str], sides: tuple[int, int]) -> None:
    """Write n_per_class images into each class folder of one split (classes interleaved in the random stream)."""
    for name in names:
        (folder / name).mkdir(parents=True)
    for i in range(n_per_class):
        for cls, name in enumerate(names):
            img = draw_classify_image(rng, cls, int(rng.integers(sides[0], sides[1] + 1)))
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {folder / name} image {i}")
            (folder / name / f"{name}_{i:05d}.jpg").write_bytes(buf.tobytes())


def generate_shapes_classify(root: Union[str, Path], n_train: int = 300, n_val: int = 50, seed: int = 0,
                             names: Sequence[str] = SHAPE_NAMES, sides: tuple[int, int] = CLS_SIDES) -> Path:
    """Create the shapes classification dataset at root (n_train / n_val images per class); built in a temp dir, then renamed.

    An existing complete dataset (train/ and val/ present) is kept as it is; a non-empty folder that is not one is
    refused with FileExistsError, so an interrupted run never leaves something that looks complete.
    """
    names = _check_names(names)

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        _write_split(tmp / "train", n_train, rng, names, sides)
        _write_split(tmp / "val", n_val, rng, names, sides)

    return build_in_place(Path(root), ("train", "val"), write, "shapes classification dataset",
                          f"{n_train} train, {n_val} val images per class, {len(names)} classes")
