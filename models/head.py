"""The detection-head contract every head implements, and the registry that maps a head kind to its class.

A head's `kind` travels in checkpoints and export metadata; callers that find none (old files) use "anchor_based".
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from torch import nn

HeadT = TypeVar("HeadT", bound="Head")


class Head(nn.Module):
    """Base class of detection heads: names the output layout and loss terms, and decodes its inference output.

    Instances provide `nc` (classes), `nl` (input levels) and the `stride` buffer (float, one value per level).
    """

    kind: ClassVar[str] = ""  # registry key, checkpoint/export metadata, loss selection
    export_layout: ClassVar[str] = ""  # human-readable shape of the exported (first eval) output
    anchor_axis: ClassVar[int] = 1  # the axis of that output that runs over predictions (dynamic in ONNX, split by TTA)
    nms_free: ClassVar[bool] = False  # one prediction per object (RT-DETR's queries): inference ranks them, no NMS
    yaml_args: ClassVar[tuple[str, ...]] = ("nc",)  # a generic ("head"-kind) yaml row's arguments, built as cls(nc, ch, strides, *rest)
    uses_targets: ClassVar[bool] = False  # training forward takes the batch's targets too (RT-DETR's denoising queries)

    nc: int
    nl: int
    stride: torch.Tensor  # buffer, declared for the type checker (nn.Module.__getattr__ is untyped)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference output with `nm` extra values per box (e.g. mask coefficients) -> (boxes xyxy pixels (B, N, 4),
        class scores (B, N, nc), extras (B, N, nm)); pure tensor maths, so exported files decode without a module."""
        raise NotImplementedError


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes (..., 4) to corner boxes (..., 4); kept here because models/ may not import utils/."""
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def check_output_width(pred: torch.Tensor, axis: int, least: int, layout: str) -> None:
    """Raise ValueError unless `pred` is 3-d with at least `least` box+score entries along `axis`."""
    if pred.dim() != 3 or pred.shape[axis] < least:
        raise ValueError(f"split_output: expected a {layout} tensor with at least {least} entries on axis {axis}, got {tuple(pred.shape)}")


_HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[HeadT]) -> type[HeadT]:
    """Class decorator: register a Head subclass under its `kind` (empty or duplicate kinds raise ValueError)."""
    kind = getattr(cls, "kind", "")
    if not isinstance(cls, type) or not issubclass(cls, Head) or not kind:
        raise ValueError(f"register_head: {cls!r} must be a Head subclass with a non-empty kind")
    if kind in _HEADS and _HEADS[kind] is not cls:
        raise ValueError(f"head kind {kind!r} is already registered to {_HEADS[kind].__name__}")
    _HEADS[kind] = cls
    return cls


def head_class(kind: str) -> type[Head]:
    """The Head class registered for `kind`; unknown kinds raise ValueError listing the known ones."""
    if not isinstance(kind, str) or kind not in _HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(known_heads())}")
    return _HEADS[kind]


def known_heads() -> tuple[str, ...]:
    """Registered head kinds, sorted."""
    return tuple(sorted(_HEADS))
