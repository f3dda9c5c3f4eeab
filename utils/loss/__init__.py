"""Training losses, one per head kind: `build_loss` picks the loss that matches the model's head.

models/ must not import training code, so a head only declares its `kind`; the loss for that kind registers here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Protocol

import torch
from torch import nn

from utils.loss.anchor_based import ComputeLoss, scale_loss_gains
from utils.loss.anchor_free import AnchorFreeLoss, unwrap_head
from utils.loss.classify import ClassifyLoss
from utils.loss.detr import DETRLoss
from utils.loss.end2end import End2EndLoss
from utils.loss.segment import SegmentLoss


class DetectionLoss(Protocol):
    """(raw head outputs, targets [image, class, cx, cy, w, h]) -> (loss to back-propagate, detached per-item losses).

    The YOLO losses return their loss times the batch size, as YOLOv5/YOLOv8 do; RT-DETR's the plain sum, as it does.
    The segmentation loss also takes the ground-truth masks as a third argument (see utils.loss.segment).
    """

    names: tuple[str, ...]

    def __call__(self, preds: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the Trainer before each epoch (0-based) of `epochs`: losses with a schedule follow it."""


LossFactory = Callable[[nn.Module, Mapping[str, Any], int, float], DetectionLoss]
_LOSSES: dict[str, LossFactory] = {}


def register_loss(kind: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator: the factory builds the loss for heads whose `kind` is `kind`."""

    def wrap(factory: LossFactory) -> LossFactory:
        if kind in _LOSSES:
            raise ValueError(f"a loss for head kind {kind!r} is already registered")
        _LOSSES[kind] = factory
        return factory

    return wrap


def build_loss(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float = 0.0) -> DetectionLoss:
    """The loss for `model`'s head (DDP-wrapped models too); unknown head kinds raise ValueError listing the known ones."""
    kind = str(unwrap_head(model).kind)  # a Head's ClassVar (nn.Module attributes type as Tensor)
    if kind not in _LOSSES:
        raise ValueError(f"no loss for head kind {kind!r}; known: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[kind](model, hyp, imgsz, label_smoothing)


@register_loss("anchor_based")
def _anchor_based(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """YOLOv5's loss with its gains rescaled for the number of levels, classes and the image size."""
    head: Any = unwrap_head(model)
    return ComputeLoss(model, scale_loss_gains(dict(hyp), head.nl, head.nc, imgsz), label_smoothing=label_smoothing)


@register_loss("anchor_free")
def _anchor_free(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """YOLOv8's loss; its gains are used as given (YOLOv8 does not rescale them)."""
    return AnchorFreeLoss(model, hyp)


@register_loss("end2end")
def _end2end(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """The anchor-free loss on both branches of the end-to-end head, weighted by YOLO26's schedule."""
    return End2EndLoss(model, hyp)


@register_loss("segment")
def _segment(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """YOLOv5-seg's loss, gains rescaled like the anchor-based loss; hyp "overlap_mask" (default True) picks the mask encoding."""
    head: Any = unwrap_head(model)
    gains = scale_loss_gains(dict(hyp), head.nl, head.nc, imgsz)
    return SegmentLoss(model, gains, label_smoothing=label_smoothing, overlap=bool(hyp.get("overlap_mask", True)))


@register_loss("rtdetr")
def _rtdetr(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """RT-DETR's Hungarian-matched loss; gains cls (varifocal), box (L1) and giou from the hyp, used as given."""
    head: Any = unwrap_head(model)
    return DETRLoss(head.nc, hyp)


@register_loss("classify")
def _classify(model: nn.Module, hyp: Mapping[str, Any], imgsz: int, label_smoothing: float) -> DetectionLoss:
    """Cross-entropy with --label-smoothing (YOLOv5's classifier loss); the hyp file's gains do not apply."""
    return ClassifyLoss(label_smoothing)


__all__ = [
    "AnchorFreeLoss", "ClassifyLoss", "ComputeLoss", "DETRLoss", "DetectionLoss", "End2EndLoss", "SegmentLoss", "build_loss",
    "register_loss", "scale_loss_gains",
]
