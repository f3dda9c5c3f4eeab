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
        """Validate keys and values (finite numbers) and build the object."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise HypError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in values]
        if missing:
            raise HypError(f"{source}: missing key(s) {', '.join(missing)}")
        for k, v in values.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise HypError(f"{source}: {k} must be a finite number, got {v!r}")
            if v < 0:
                raise HypError(f"{source}: {k} must not be negative, got {v!r}")
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
