"""Anchor-free (YOLOv8-style) detection loss: Task-Aligned assignment, BCE classification, CIoU box and DFL terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.heads.anchor_points import bbox2dist, dist2bbox, make_anchors
from utils.boxes import bbox_iou, xywh2xyxy
from utils.loss.assigner import TaskAlignedAssigner
from utils.loss.schedule import FixedOverTraining

DFL_MARGIN = 0.01  # target distances are clipped to reg_max - 1 - margin so that the right bin tl + 1 exists


def dfl_expectation(box_logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distances (..., 4) in grid units from side-major bin logits (..., 4 * reg_max): the expectation of each softmax.

    reg_max 1 (no DFL, YOLO26) regresses each side directly: the four outputs are the distances themselves.
    """
    if reg_max == 1:
        return box_logits
    probs = box_logits.unflatten(-1, (4, reg_max)).softmax(-1)
    return probs @ torch.arange(reg_max, dtype=probs.dtype, device=probs.device)


def dfl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss (n,) of bin logits (n, reg_max) against distances (n,) in [0, reg_max - 1).

    Cross-entropy towards the two bins around the target, weighted by linear interpolation: its minimum, the entropy of
    that two-bin distribution, is reached when the softmax equals it, whose expectation is the target itself.
    """
    left = target.long()  # floor, as the targets are non-negative
    w_left = (left + 1) - target
    ce_left = F.cross_entropy(logits, left, reduction="none")
    ce_right = F.cross_entropy(logits, left + 1, reduction="none")
    return ce_left * w_left + ce_right * (1 - w_left)


def preprocess_targets(targets: torch.Tensor, batch_size: int, img_w: float, img_h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [image, class, cx, cy, w, h] (normalised) -> padded (B, M, 5) [class, x1, y1, x2, y2] in pixels and its validity.

    M is the largest count per image; within an image the ground truths keep their input order; padding rows are zero
    and marked False in the (B, M, 1) mask.
    """
    if targets.shape[0] and not ((targets[:, 0] >= 0) & (targets[:, 0] < batch_size)).all():
        raise ValueError(f"target image indices must lie in [0, {batch_size}), got {targets[:, 0].unique().tolist()}")
    img = targets[:, 0].long()
    counts = torch.bincount(img, minlength=batch_size)
    m = int(counts.max()) if targets.shape[0] else 0
    out = torch.zeros(batch_size, m, 5, dtype=targets.dtype, device=targets.device)
    if m:
        order = torch.sort(img, stable=True).indices
        img_sorted = img[order]
        first = torch.cumsum(counts, 0) - counts  # row of each image's first target in the sorted order
        slot = torch.arange(targets.shape[0], device=targets.device) - first[img_sorted]
        scale = torch.tensor([img_w, img_h, img_w, img_h], dtype=targets.dtype, device=targets.device)
        rows = targets[order]
        out[img_sorted, slot] = torch.cat((rows[:, 1:2], xywh2xyxy(rows[:, 2:6]) * scale), 1)
    mask = torch.arange(m, device=targets.device)[None] < counts[:, None]
    return out, mask[..., None]


def unwrap_head(model: nn.Module) -> nn.Module:
    """The detection head of a model, possibly wrapped in DataParallel/DDP (`.module`): `model.head` or `model.detect`."""
    inner = getattr(model, "module", model)
    for name in ("head", "detect"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise AttributeError(f"{type(inner).__name__} has neither a `head` nor a `detect` module")


class AnchorFreeLoss(FixedOverTraining):
    """Callable loss of an anchor-free head: (level outputs, targets) -> (loss * batch size, detached [box, cls, dfl])."""

    names: tuple[str, ...] = ("box_loss", "cls_loss", "dfl_loss")

    def __init__(self, model: nn.Module, hyp: Mapping[str, float], topk: int = 10) -> None:
        head: Any = unwrap_head(model)  # reads plain attributes nc, reg_max, no, stride
        missing = [k for k in ("box", "cls", "dfl") if k not in hyp]
        if missing:
            raise KeyError(f"anchor-free loss needs the hyp gains {missing}")
        self.gains = (float(hyp["box"]), float(hyp["cls"]), float(hyp["dfl"]))
        self.nc, self.reg_max, self.no = int(head.nc), int(head.reg_max), int(head.no)
        self.strides = [float(s) for s in torch.as_tensor(head.stride).tolist()]
        if self.no != 4 * self.reg_max + self.nc or not self.strides or min(self.strides) <= 0:
            raise ValueError(f"head needs no = 4 * reg_max + nc and positive strides, got no={self.no}, strides={self.strides}")
        self.assigner = TaskAlignedAssigner(topk=topk, num_classes=self.nc, alpha=0.5, beta=6.0)

    def __call__(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss scaled by batch size (for backward) and the detached gain-weighted (box, cls, dfl) components."""
        device = preds[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute([p.float() for p in preds], targets.to(device=device, dtype=torch.float32))

    def _compute(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss itself, in float32 (called by __call__ with autocast off)."""
        bs = preds[0].shape[0]
        box_logits, cls_logits = self._flatten(preds)
        points, stride = make_anchors(preds, self.strides, 0.5)  # grid units (N, 2), (N, 1)
        pred_boxes = dist2bbox(dfl_expectation(box_logits, self.reg_max), points, xywh=False)  # grid units (B, N, 4)
        img_h, img_w = preds[0].shape[2] * self.strides[0], preds[0].shape[3] * self.strides[0]
        gt, mask = preprocess_targets(targets, bs, img_w, img_h)
        scores, boxes_px = cls_logits.detach().sigmoid(), pred_boxes.detach() * stride
        _, target_boxes, target_scores, fg, _ = self.assigner(scores, boxes_px, points * stride, gt[..., :1], gt[..., 1:], mask)
        score_sum = target_scores.sum().clamp(min=1)
        cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / score_sum
        if fg.any():
            box, dfl = self._box_terms(box_logits, pred_boxes, points, target_boxes / stride, target_scores, fg)
            box, dfl = box / score_sum, dfl / score_sum
        else:  # zero, yet connected to the box channels so every parameter gets a (zero) gradient, as DDP expects
            box = dfl = box_logits.sum() * 0.0
        items = torch.stack((box * self.gains[0], cls * self.gains[1], dfl * self.gains[2]))
        return items.sum() * bs, items.detach()

    def _flatten(self, preds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Level outputs (B, no, H, W) -> box logits (B, N, 4 * reg_max) and class logits (B, N, nc), levels in order."""
        for i, p in enumerate(preds):
            if p.ndim != 4 or p.shape[1] != self.no:
                raise ValueError(f"level {i}: expected (B, {self.no}, H, W) from the head, got {tuple(p.shape)}")
        flat = torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2)
        return flat.split((4 * self.reg_max, self.nc), -1)

    def _box_terms(
        self,
        box_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        points: torch.Tensor,
        target_boxes: torch.Tensor,
        target_scores: torch.Tensor,
        fg: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score-weighted sums over the foreground of 1 - CIoU and of the side-averaged DFL; boxes in grid units."""
        weight = target_scores.sum(-1)[fg]
        iou = bbox_iou(pred_boxes[fg], target_boxes[fg], xywh=False, CIoU=True)
        box = ((1.0 - iou) * weight).sum()
        if self.reg_max == 1:  # no distribution to fit: the box term alone trains the distances
            return box, box_logits.sum() * 0.0
        dist = bbox2dist(points, target_boxes, self.reg_max - 1 - DFL_MARGIN)[fg]  # (n_fg, 4)
        side_loss = dfl_loss(box_logits[fg].reshape(-1, self.reg_max), dist.reshape(-1)).view(-1, 4)
        return box, (side_loss.mean(-1) * weight).sum()
