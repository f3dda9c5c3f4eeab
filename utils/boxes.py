"""Box format conversions and coordinate mapping (numpy arrays and torch tensors alike)."""

from __future__ import annotations

import math
from typing import TypeVar, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)  # the result has the same type (numpy or torch) as the input


def _like(x: ArrayT) -> ArrayT:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: ArrayT) -> ArrayT:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    y = _like(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: ArrayT) -> ArrayT:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    y = _like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: ArrayT, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> ArrayT:
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2), plus an optional padding offset."""
    y = _like(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: ArrayT, w: float = 640, h: float = 640, clip: bool = False) -> ArrayT:
    """Pixel (x1, y1, x2, y2) -> normalised (cx, cy, w, h), optionally clipped to the image first."""
    if clip:
        x = clip_boxes(_like(x), (h, w))
    y = _like(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: ArrayT, shape: tuple[float, float]) -> ArrayT:
    """Clip xyxy boxes in place to an image of shape (h, w); returns them."""
    h, w = shape[:2]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(img1_shape: tuple[int, int], boxes: ArrayT, img0_shape: tuple[int, int], ratio_pad: tuple | None = None) -> ArrayT:
    """Map xyxy boxes from a letterboxed image of shape img1_shape back to the original img0_shape (in place)."""
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def box_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes, shape (N, M)."""
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    wh = (torch.min(box1[:, None, 2:], box2[:, 2:]) - torch.max(box1[:, None, :2], box2[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2 - inter)


def _corners(box: torch.Tensor, xywh: bool) -> tuple[torch.Tensor, ...]:
    """Split (..., 4) boxes into x1, y1, x2, y2, w, h."""
    if xywh:
        cx, cy, w, h = box.unbind(-1)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w, h
    x1, y1, x2, y2 = box.unbind(-1)
    return x1, y1, x2, y2, x2 - x1, y2 - y1


def bbox_iou(
    box1: torch.Tensor, box2: torch.Tensor, xywh: bool = True, GIoU: bool = False, DIoU: bool = False, CIoU: bool = False, eps: float = 1e-7
) -> torch.Tensor:
    """Element-wise (broadcast) IoU of (..., 4) boxes, optionally the GIoU/DIoU/CIoU variant; returns shape (...)."""
    ax1, ay1, ax2, ay2, aw, ah = _corners(box1, xywh)
    bx1, by1, bx2, by2, bw, bh = _corners(box2, xywh)
    ah, bh = ah + eps, bh + eps  # keeps atan(w/h) finite for degenerate boxes
    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    hull_w = torch.max(ax2, bx2) - torch.min(ax1, bx1)
    hull_h = torch.max(ay2, by2) - torch.min(ay1, by1)
    if GIoU and not (DIoU or CIoU):
        hull_area = hull_w * hull_h + eps
        return iou - (hull_area - union) / hull_area
    diag2 = hull_w**2 + hull_h**2 + eps
    centre2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    if not CIoU:
        return iou - centre2 / diag2
    v = (4 / math.pi**2) * (torch.atan(bw / bh) - torch.atan(aw / ah)).pow(2)
    with torch.no_grad():  # trade-off weight; 1 - iou clamped so near-identical boxes cannot divide by ~0
        alpha = v / (v + (1 - iou).clamp(min=0) + eps)
    return iou - (centre2 / diag2 + v * alpha)
