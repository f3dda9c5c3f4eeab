"""Test-time augmentation: run the model on scaled and flipped copies and merge the de-augmented predictions."""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import Head


class _Augmentable(Protocol):
    """What TTA uses of a DetectionModel (typed structurally: models/model.py imports this module, not the reverse)."""

    stride: torch.Tensor

    @property
    def head(self) -> Head: ...

    @property
    def head_kind(self) -> str: ...

    @property
    def task(self) -> str: ...

    def forward_once(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Any: ...

SCALES = (1.0, 0.83, 0.67)
FLIPS = (None, 3, None)  # 3 = left-right flip of NCHW


def scale_image(img: torch.Tensor, ratio: float, gs: int = 32) -> torch.Tensor:
    """Resize a (B,3,H,W) batch by `ratio` and pad it to a multiple of the stride `gs` (pad value 0.447 = 114/255)."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    ph, pw = (-s[0]) % gs, (-s[1]) % gs
    return F.pad(img, [0, pw, 0, ph], value=0.447)


def _deaugment(p: torch.Tensor, scale: float, flip: int | None, img_w: int) -> torch.Tensor:
    """Map (B,N,no) xywh predictions from an augmented image back to the original image."""
    p = p.clone()
    p[..., :4] /= scale
    if flip == 3:
        p[..., 0] = img_w - p[..., 0]
    return p


def _clip_augmented(preds: list[torch.Tensor], nl: int) -> list[torch.Tensor]:
    """Drop the largest-object level of the full-size pass and the smallest-object level of the smallest pass.

    Level l of a pass holds a 4**(nl-1-l) share of its predictions (P3 first), as in YOLOv5's TTA.
    """
    units = sum(4**k for k in range(nl))
    per_unit_first = preds[0].shape[1] // units
    preds[0] = preds[0][:, : preds[0].shape[1] - per_unit_first]  # P5 is one unit, at the end
    per_unit_last = preds[-1].shape[1] // units
    preds[-1] = preds[-1][:, per_unit_last * 4 ** (nl - 1) :]  # P3 is 4**(nl-1) units, at the start
    return preds


def forward_augment(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Inference on 3 scales (1, 0.83 flipped, 0.67); returns predictions in `x` pixels, in the head's output layout."""
    det_model = cast(_Augmentable, model)
    policy = det_model.head.policy
    if policy.tta_reason:
        raise ValueError(f"TTA is not supported for {policy.title} models: {policy.tta_reason}")
    if det_model.head.nms_free:  # merging the passes needs NMS, which these heads are built to do without
        raise ValueError(f"TTA is not supported for NMS-free heads ({det_model.head_kind})")
    stride = int(max(det_model.stride.max().item(), 32))
    rows_last = det_model.head.anchor_axis == 2  # (B, C, N) layouts: work on (B, N, C), transpose back at the end
    outputs = []
    for scale, flip in zip(SCALES, FLIPS):
        xi = scale_image(x.flip(flip) if flip else x, scale, stride)
        pred = det_model.forward_once(xi)[0]
        pred = pred.transpose(1, 2) if rows_last else pred
        outputs.append(_deaugment(pred, scale, flip, x.shape[3]))
    outputs = _clip_augmented(outputs, det_model.head.nl)
    merged = torch.cat(outputs, 1)
    return (merged.transpose(1, 2) if rows_last else merged), None
