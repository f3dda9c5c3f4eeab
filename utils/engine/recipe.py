"""The training schedule: YOLOv5's (accumulate to a nominal batch of 64, warm-up >= 100 iterations) or, for small
datasets, one counted in optimizer steps so that short runs on a few hundred images actually learn."""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.heads.base import head_policy

RECIPES = ("auto", "small", "yolov5")
SMALL_DATASET = 1000  # images; below this `--recipe auto` picks the small-data schedule
YOLOV5_NOMINAL_BATCH = 64
YOLOV5_MIN_WARMUP = 100  # iterations
FULL_AUGMENTATION_STEPS = 3000  # optimizer steps from which the small-data schedule keeps the hyp file's augmentation
MIN_AUGMENTATION = 0.5  # the weakest it scales augmentation to, for the shortest runs
SCALED_AUGMENTATION = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "mixup")


@dataclass(frozen=True)
class Schedule:
    """How gradients accumulate, how long the warm-up lasts and when mosaic stops; `reason` is the line train.py prints."""

    name: str
    nominal_batch: int
    warmup_iters: int  # -1: no warm-up
    close_mosaic: int  # epochs at the end trained without mosaic
    reason: str
    augmentation: float = 1.0  # factor on the colour and geometry augmentation gains of the hyp file

    def augment_hyp(self, hyp: dict[str, float]) -> dict[str, float]:
        """The hyp with its colour/geometry augmentation gains scaled by `augmentation` (flips and mosaic unchanged)."""
        return {k: v * self.augmentation if k in SCALED_AUGMENTATION else v for k, v in hyp.items()}

    def accumulate(self, batch_size: int) -> int:
        """Batches per optimizer step."""
        return max(round(self.nominal_batch / batch_size), 1)


def choose_schedule(recipe: str, n_images: int, batch_size: int, batches_per_epoch: int, epochs: int,
                    warmup_epochs: float, close_mosaic: int, mosaic: bool = True) -> Schedule:
    """The schedule for `recipe` ("auto" picks "small" below SMALL_DATASET images, else "yolov5"); without mosaic (hyp
    mosaic 0, e.g. a classifier's) there is no mosaic to close at the end."""
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if recipe == "auto":
        recipe = "small" if n_images < SMALL_DATASET else "yolov5"
    if recipe == "yolov5":
        warmup = max(round(warmup_epochs * batches_per_epoch), YOLOV5_MIN_WARMUP) if warmup_epochs > 0 else -1
        why = f"YOLOv5 schedule: nominal batch {YOLOV5_NOMINAL_BATCH}, warm-up {warmup} iterations"
        return Schedule("yolov5", YOLOV5_NOMINAL_BATCH, warmup, close_mosaic if mosaic else 0, why)
    total = batches_per_epoch * epochs
    warmup = min(round(warmup_epochs * batches_per_epoch), math.ceil(0.1 * total)) if warmup_epochs > 0 else -1
    closing = (close_mosaic or (max(1, round(0.15 * epochs)) if epochs >= 3 else 0)) if mosaic else 0
    # few steps cannot fit heavily distorted images: weaker augmentation, rising as sqrt(steps) to full at FULL_AUGMENTATION_STEPS
    strength = round(min(1.0, max(MIN_AUGMENTATION, math.sqrt(total / FULL_AUGMENTATION_STEPS))), 2)
    why = (f"small-data schedule ({n_images} training images < {SMALL_DATASET}): every batch of {batch_size} is an optimizer "
           f"step ({batches_per_epoch}/epoch, {total} in all), warm-up {max(warmup, 0)} steps, augmentation x{strength:g}"
           + (f", mosaic off for the last {closing} epoch(s)" if mosaic else "")
           + f"; --recipe yolov5 restores YOLOv5's (nominal batch {YOLOV5_NOMINAL_BATCH}, "
           f">= {YOLOV5_MIN_WARMUP} warm-up iterations, the hyp file's augmentation)")
    return Schedule("small", batch_size, warmup, closing, why, strength)


def close_mosaic_epochs(flag: int, head_kind: str, epochs: int) -> int:
    """--close-mosaic as given; for a head whose recipe ends without mosaic (its policy's close_mosaic_share, RT-DETR's
    0.15), 0 means that share of the run, at most 10 epochs (none for runs under 3 epochs)."""
    share = head_policy(head_kind).close_mosaic_share
    if flag or not share or epochs < 3:
        return flag
    return min(10, max(1, round(share * epochs)))
