"""Typed training hyperparameters loaded from a YOLOv5-format yaml: unknown or missing keys are refused in one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Union

from models.heads.base import head_policy
from utils.files import read_yaml_mapping
from utils.paths import ROOT

HYP_DIR = ROOT / "data" / "hyps"
RTDETR_KEYS = ("giou", "backbone_lr", "clip_grad")  # optional keys RT-DETR's recipe sets (evolve leaves them out)


class HypError(ValueError):
    """A hyperparameter file or value that cannot train; the message is one line naming the file and key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a hyperparameter may take: lo..hi, each end closed unless marked open."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        """Whether v lies inside."""
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        """Interval notation, e.g. (0, 1]."""
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def clip(self, v: float) -> float:
        """v moved to the nearest value inside (an open end: 1e-4 of the span inside it)."""
        if v in self:
            return v
        margin = (self.hi - self.lo) * 1e-4
        if v <= self.lo:
            return self.lo + margin if self.lo_open else self.lo
        return self.hi - margin if self.hi_open else self.hi


_UNIT, _GAIN = Range(0.0, 1.0), Range(0.0, 50.0)
# The sane range of every key: wide enough for any recipe (the shipped files sit well inside), narrow enough to refuse
# a typo such as lr0: 1e12 when the file is loaded instead of after an epoch of NaN losses.
HYP_RANGES: dict[str, Range] = {
    "lr0": Range(0.0, 1.0, lo_open=True), "lrf": _UNIT, "momentum": Range(0.0, 1.0, hi_open=True),
    "weight_decay": Range(0.0, 0.1), "warmup_epochs": Range(0.0, 100.0), "warmup_momentum": Range(0.0, 1.0, hi_open=True),
    "warmup_bias_lr": _UNIT, "box": _GAIN, "cls": _GAIN, "cls_pw": Range(0.0, 10.0, lo_open=True), "obj": _GAIN,
    "obj_pw": Range(0.0, 10.0, lo_open=True), "iou_t": _UNIT, "anchor_t": Range(1.0, 20.0), "fl_gamma": Range(0.0, 10.0),
    "hsv_h": _UNIT, "hsv_s": _UNIT, "hsv_v": _UNIT, "degrees": Range(0.0, 180.0), "translate": _UNIT,
    "scale": Range(0.0, 1.0, hi_open=True), "shear": Range(0.0, 45.0), "perspective": Range(0.0, 0.01), "flipud": _UNIT,
    "fliplr": _UNIT, "mosaic": _UNIT, "mixup": _UNIT, "copy_paste": _UNIT, "dfl": _GAIN, "giou": _GAIN,
    "backbone_lr": _UNIT, "clip_grad": Range(0.0, 100.0),
}


def clip_hyp(values: dict[str, float]) -> dict[str, float]:
    """Every value moved into its key's HYP_RANGES range (evolve's mutations); unknown keys are left as they are."""
    return {k: HYP_RANGES[k].clip(v) if k in HYP_RANGES else v for k, v in values.items()}


def _check_value(source: str, key: str, v: Any) -> None:
    """One HypError line naming the file, key, value and allowed range unless v is a finite number inside it."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise HypError(f"{source}: {key} must be a finite number, got {v!r}")
    allowed = HYP_RANGES[key]
    if v < 0 <= allowed.lo:
        raise HypError(f"{source}: {key} must not be negative, got {v!r} (allowed: {allowed})")
    if v not in allowed:
        raise HypError(f"{source}: {key} {v!r} is outside the sane range {allowed}")


@dataclasses.dataclass(frozen=True)
class Hyp:
    """YOLOv5's hyperparameters (every key required, as in its hyp files) plus optional keys of the other heads."""

    lr0: float
    lrf: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float
    box: float
    cls: float
    cls_pw: float
    obj: float
    obj_pw: float
    iou_t: float
    anchor_t: float
    fl_gamma: float
    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    perspective: float
    flipud: float
    fliplr: float
    mosaic: float
    mixup: float
    copy_paste: float
    dfl: float = 1.5  # anchor-free heads only; YOLOv5 files do not have it
    giou: float = 2.0  # RT-DETR's GIoU loss gain (its L1 gain is `box`)
    backbone_lr: float = 1.0  # LR factor of the backbone rows when they start from pretrained weights (RT-DETR: 0.1)
    clip_grad: float = 10.0  # gradient-norm clip (YOLOv5: 10; RT-DETR: 0.1; 0: none)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "hyperparameters") -> Hyp:
        """Validate keys and values (finite numbers inside HYP_RANGES) and build the object."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise HypError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in values]
        if missing:
            raise HypError(f"{source}: missing key(s) {', '.join(missing)}")
        for k, v in values.items():
            _check_value(source, k, v)
        return cls(**{k: float(v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float]:
        """Plain dict (hyp.yaml, checkpoints, the augmentation and loss code)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: float) -> Hyp:
        """A copy with some values changed."""
        return dataclasses.replace(self, **changes)


def load_hyp(source: Union[str, Path, dict, Hyp]) -> Hyp:
    """Hyperparameters from a yaml file, a dict or a Hyp."""
    if isinstance(source, Hyp):
        return source
    if isinstance(source, dict):
        return Hyp.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise HypError(f"{path}: hyperparameter file not found")
    return Hyp.from_dict(read_yaml_mapping(path, HypError, "hyperparameter names to numbers"), str(path))


def default_hyp_file(head_kind: str) -> Path:
    """The hyp file a head trains with when --hyp is not given (its policy's); unknown kinds raise ValueError."""
    return HYP_DIR / head_policy(head_kind).hyp_file


def default_optimizer(head_kind: str) -> str:
    """The optimizer `--optimizer auto` picks for a head (its policy's); unknown kinds raise ValueError."""
    return head_policy(head_kind).optimizer
