"""Classification transforms (YOLOv5's classify pipeline): random resized crop, flips and colour jitter for training,
short-side resize plus centre crop for evaluation, both ending in ImageNet mean/std normalisation of RGB (or, with
normalize=False, in plain 0-255 uint8 RGB for models that take 0-1 input like the detector).

Images come in as BGR uint8 HxWx3 (utils.data.images.load_image) and leave as (3, size, size) tensors whose memory is
channels-last (a CHW view of an HWC array), which utils.data.datasets.stack_channels_last batches cheaply.
The augmentation reads hyp-file keys: scale, fliplr, flipud, hsv_h, hsv_s, hsv_v (see classify_hyp).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
# Training augmentation defaults (YOLOv5 classify, in hyp-file terms): crops keep 1 - scale .. all of the image area
# (0.92: YOLOv5's 8-100%) at an aspect in ratio, flip probabilities, hue shift of up to +-hsv_h of the hue circle,
# saturation jitter of strength hsv_s and brightness/contrast jitter of strength hsv_v (factors 1 +- strength).
DEFAULT_CLASSIFY_HYP: dict[str, Any] = {"scale": 0.92, "ratio": (3 / 4, 4 / 3), "fliplr": 0.5, "flipud": 0.0,
                                        "hsv_h": 0.015, "hsv_s": 0.4, "hsv_v": 0.4}
_LUMA_RGB = np.array([0.299, 0.587, 0.114], np.float32)


def classify_hyp(hyp: dict | None = None) -> dict[str, Any]:
    """DEFAULT_CLASSIFY_HYP updated with hyp's known keys (other hyp-file keys ignored); scale becomes an area range.

    scale is a number s (crops keep 1 - s .. 1 of the area, the hyp-file convention) or an explicit (min, max) range."""
    out = dict(DEFAULT_CLASSIFY_HYP)
    out.update({k: v for k, v in (hyp or {}).items() if k in DEFAULT_CLASSIFY_HYP})
    scale = out["scale"]
    try:
        lo, hi = (1.0 - float(scale), 1.0) if isinstance(scale, (int, float)) else (float(v) for v in scale)
        r0, r1 = (float(v) for v in out["ratio"])
        rest = {k: float(out[k]) for k in ("fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v")}
    except (TypeError, ValueError):
        raise ValueError(f"classify hyp: scale must be a number or (min, max), ratio (min, max), the others numbers; got {out}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"classify hyp 'scale' {scale} gives the crop area range ({lo:g}, {hi:g}); it must lie in (0, 1]")
    if not 0 < r0 <= r1:
        raise ValueError(f"classify hyp 'ratio' must satisfy 0 < min <= max, got {out['ratio']}")
    return {**rest, "scale": (lo, hi), "ratio": (r0, r1)}


def crop_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (x, y, cw, ch) crop covering a `scale` share of the area with aspect cw/ch in `ratio` (log-uniform);
    after 10 failed draws the centre crop of the closest allowed aspect, the usual RandomResizedCrop rule."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(max(cw, 1), w), min(max(ch, 1), h)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize to w x h: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if img.shape[:2] == (h, w):
        return img
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to size and cut the central size x size square (the evaluation view)."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize(img[top:top + s, left:left + s], size, size)


def colour_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength], applied in random order,
    then a hue shift of up to +-hue of the circle; float32 RGB in [0, 255] in and out."""
    for op in rng.permutation(3):
        strength = (brightness, contrast, saturation)[op]
        if strength > 0:
            f = np.float32(rng.uniform(max(0.0, 1 - strength), 1 + strength))
            if op == 0:  # brightness
                img = img * f
            elif op == 1:  # contrast: blend with the mean grey level
                m = np.float32((img @ _LUMA_RGB).mean())
                img = (img - m) * f + m
            else:  # saturation: blend with each pixel's grey level
                grey = (img @ _LUMA_RGB)[..., None]
                img = (img - grey) * f + grey
            img = np.clip(img, 0, 255, out=img)
    if hue > 0:
        hsv = cv2.cvtColor(np.rint(img).astype(np.uint8), cv2.COLOR_RGB2HSV)
        shift = int(round(rng.uniform(-hue, hue) * 180))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    return img


def to_tensor(rgb: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """RGB HxWx3 (uint8 or float in [0, 255]) -> (3, H, W) tensor, channels-last in memory: ImageNet-normalised float32,
    or uint8 0-255 when not normalize."""
    if normalize:
        scale = np.float32(255.0) * np.array(IMAGENET_STD, np.float32)
        out = (rgb.astype(np.float32) - np.float32(255.0) * np.array(IMAGENET_MEAN, np.float32)) / scale
    else:
        out = rgb if rgb.dtype == np.uint8 else np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def eval_transform(img: np.ndarray, size: int, normalize: bool = True) -> torch.Tensor:
    """BGR uint8 image -> (3, size, size) tensor of its centre (see to_tensor); deterministic."""
    return to_tensor(cv2.cvtColor(centre_crop(img, size), cv2.COLOR_BGR2RGB), normalize)


def train_transform(img: np.ndarray, size: int, hyp: dict[str, Any], rng: np.random.Generator, normalize: bool = True) -> torch.Tensor:
    """BGR uint8 image -> (3, size, size) tensor (see to_tensor) of a random resized crop, flipped and colour-jittered;
    hyp as classify_hyp returns it."""
    x, y, cw, ch = crop_box(img.shape[0], img.shape[1], hyp["scale"], hyp["ratio"], rng)
    out = cv2.cvtColor(_resize(img[y:y + ch, x:x + cw], size, size), cv2.COLOR_BGR2RGB)
    if rng.random() < hyp["fliplr"]:
        out = out[:, ::-1]
    if rng.random() < hyp["flipud"]:
        out = out[::-1]
    out = colour_jitter(out.astype(np.float32), hyp["hsv_v"], hyp["hsv_v"], hyp["hsv_s"], hyp["hsv_h"], rng)
    return to_tensor(out, normalize)
