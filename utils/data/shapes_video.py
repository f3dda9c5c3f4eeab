"""A synthetic tracking video: the embedded dataset's shapes moving over one fixed background, with MOT ground truth.

The shapes are drawn by the dataset's own functions (draw_background, draw_shape), so a detector trained on
data/shapes.yaml sees the kind of objects it learnt. Each object keeps its class, size and colour, moves at a constant
speed whose direction drifts a little every frame, and bounces off the frame edges; objects pass over one another and
the one drawn later (higher id) hides the other. Everything follows from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from utils.data.shapes_dataset import draw_background, draw_shape

MIN_SIDE, MAX_SIDE = 0.1, 0.35  # object side range as a fraction of the frame's short side (the dataset's look at 320 px)
MIN_SPEED, MAX_SPEED = 0.004, 0.012  # pixels per frame as a fraction of the frame's long side
TURN_STD = 0.05  # radians per frame of random direction change


@dataclass
class _Mover:
    """One object: class, drawing seed (fixes colour and triangle form), size, top-left position and velocity."""

    cls: int
    seed: int
    w: int
    h: int
    x: float
    y: float
    speed: float
    angle: float

    def step(self, rng: np.random.Generator, fw: int, fh: int) -> None:
        """Advance one frame, turning a little, and bounce off the frame edges."""
        self.angle += float(rng.normal(0.0, TURN_STD))
        vx, vy = self.speed * np.cos(self.angle), self.speed * np.sin(self.angle)
        self.x, vx = _bounce(self.x + vx, vx, fw - self.w)
        self.y, vy = _bounce(self.y + vy, vy, fh - self.h)
        self.angle = float(np.arctan2(vy, vx))


def _bounce(pos: float, vel: float, hi: float) -> tuple[float, float]:
    """Reflect a coordinate that left [0, hi] back inside it, and its velocity with it."""
    if pos < 0:
        return -pos, abs(vel)
    if pos > hi:
        return 2 * hi - pos, -abs(vel)
    return pos, vel


def _movers(rng: np.random.Generator, n: int, nc: int, fh: int, fw: int) -> list[_Mover]:
    """n objects with random class, size (as draw_scene sizes them), position, speed and heading."""
    short = min(fh, fw)
    lo = max(8, int(MIN_SIDE * short))
    hi = max(lo + 1, int(MAX_SIDE * short))
    movers = []
    for _ in range(n):
        cls = int(rng.integers(0, nc))
        side = int(rng.integers(lo, hi))
        w, h = (side, side) if cls == 0 or rng.random() < 0.5 else (side, int(side * rng.uniform(0.6, 1.6)))
        w, h = min(w, fw - 2), min(h, fh - 2)
        movers.append(_Mover(cls, int(rng.integers(0, 2**31)), w, h, float(rng.uniform(0, fw - w)), float(rng.uniform(0, fh - h)),
                             float(rng.uniform(MIN_SPEED, MAX_SPEED) * max(fh, fw)), float(rng.uniform(0, 2 * np.pi))))  # fmt: skip
    return movers


def _render_frame(background: np.ndarray, movers: list[_Mover]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The background with every object drawn in order; returns (BGR frame, each object's box clipped to the frame)."""
    img = background.copy()
    fh, fw = img.shape[:2]
    boxes = []
    for m in movers:
        box, _ = draw_shape(img, np.random.default_rng(m.seed), m.cls, (int(round(m.x)), int(round(m.y)), m.w, m.h))
        boxes.append(box.clip(0, [fw, fh, fw, fh]))
    return img, boxes


def generate_shapes_video(out_dir: Union[str, Path], frames: int = 150, size: tuple[int, int] = (360, 640), n_objects: int = 6,
                          nc: int = 3, fps: float = 30, seed: int = 0) -> tuple[Path, Path]:  # fmt: skip
    """Write out_dir/shapes.mp4 (mp4v) and out_dir/gt.txt (MOT rows `frame,id,x,y,w,h,1,cls,1`, frame and id from 1).

    size is (height, width); the same seed gives the same video and ground truth. Returns (video path, gt path)."""
    fh, fw = size
    if frames < 1 or n_objects < 0 or fh < 16 or fw < 16:
        raise ValueError(f"generate_shapes_video: frames={frames}, n_objects={n_objects}, size={size} out of range")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    video, gt = out / "shapes.mp4", out / "gt.txt"
    rng = np.random.default_rng(seed)
    background = draw_background(rng, fh, fw)
    movers = _movers(rng, n_objects, nc, fh, fw)
    fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]  # missing from OpenCV's type stubs
    writer = cv2.VideoWriter(str(video), fourcc, float(fps), (fw, fh))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4v video to {video}")
    lines = []
    try:
        for f in range(1, frames + 1):
            img, boxes = _render_frame(background, movers)
            writer.write(img)
            for i, (m, b) in enumerate(zip(movers, boxes), 1):
                lines.append(f"{f},{i},{b[0]:.2f},{b[1]:.2f},{b[2] - b[0]:.2f},{b[3] - b[1]:.2f},1,{m.cls},1\n")
            for m in movers:
                m.step(rng, fw, fh)
    finally:
        writer.release()
    gt.write_text("".join(lines), encoding="utf-8")
    return video, gt


def main(argv: list[str] | None = None) -> None:
    """python -m utils.data.shapes_video OUT_DIR [--frames N --height H --width W --objects K --seed S]."""
    import argparse

    p = argparse.ArgumentParser(description="Write a tracking test video of moving shapes (shapes.mp4) and its MOT ground truth (gt.txt)")
    p.add_argument("out_dir")
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--objects", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    try:
        video, gt = generate_shapes_video(opt.out_dir, opt.frames, (opt.height, opt.width), opt.objects, seed=opt.seed)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"shapes_video: error: {e}") from None
    print(f"{video}\n{gt}")


if __name__ == "__main__":
    main()
