"""Size limits a model config must keep, checked before any weight is allocated, and the largest image side.

A yaml file can ask for anything (a billion repeats, a million-fold width, a kernel of 1e6); parse_model refuses
such a config with one line instead of filling the memory. The total parameter count and the activation size are
measured on PyTorch's meta device (shapes without storage) and compared with limits a user can raise: the
`--max-params` flag of train.py and models/yolo.py, or the environment variables below for every script.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PARAMS_ENV = "MOBILE_YOLO_MAX_PARAMS"
ACTIVATIONS_ENV = "MOBILE_YOLO_MAX_ACTIVATIONS"
MAX_IMGSZ_ENV = "MOBILE_YOLO_MAX_IMGSZ"
DEFAULT_MAX_IMGSZ = 8192  # pixels per side for every script; one 8192x8192 float image is 0.8 GB before any layer runs
DEFAULT_MAX_PARAMS = 200_000_000  # 2.3x YOLOv5x (86.7M); weights, gradients and Adam state alone are ~3.2 GB
DEFAULT_MAX_ACTIVATIONS = 1_000_000_000  # layer-output elements for one 640x640 image; YOLOv5x has 41M
ACTIVATION_SIZE = 640  # the image side the activation estimate assumes
MAX_REPEATS = 100  # one row's `number` after depth_multiple; YOLOv8x's deepest row has 9
MAX_CHANNELS = 16_384  # one layer's output channels after width_multiple; YOLOv5x's widest has 1280
MAX_CLASSES = 100_000  # nc; ImageNet-21k has 21,841 classes
MAX_STRIDE = 1_024  # a layer's total stride; the shipped heads read strides 8 to 32
MAX_LAYERS = 1_000  # rows in backbone + head; YOLOv5x has 25


class LimitError(ValueError):
    """A limit value (flag or environment variable) that is not a positive integer."""


@dataclass(frozen=True)
class ModelLimits:
    """The two limits that scale with the model as a whole; the per-row limits above are fixed."""

    max_params: int = DEFAULT_MAX_PARAMS
    max_activations: int = DEFAULT_MAX_ACTIVATIONS

    @classmethod
    def resolve(cls, max_params: int | None = None) -> ModelLimits:
        """The limits in force: an explicit `max_params` (a flag), else the environment variables, else the defaults."""
        params = max_params if max_params is not None else _env_int(PARAMS_ENV, DEFAULT_MAX_PARAMS)
        if isinstance(params, bool) or not isinstance(params, int) or params < 1:
            raise LimitError(f"--max-params must be a positive integer, got {params!r}")
        return cls(params, _env_int(ACTIVATIONS_ENV, DEFAULT_MAX_ACTIVATIONS))


def max_img_size() -> int:
    """The largest image side (pixels) a script accepts: $MOBILE_YOLO_MAX_IMGSZ, else DEFAULT_MAX_IMGSZ."""
    return _env_int(MAX_IMGSZ_ENV, DEFAULT_MAX_IMGSZ)


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment (underscores and 1e9-style values allowed), else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = 0.0
    if not 1 <= value < 1e18:
        raise LimitError(f"environment variable {name} must be a positive integer, got {text!r}")
    return int(value)
