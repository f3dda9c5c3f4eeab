"""RT-DETR's training loss: Hungarian matching, varifocal classification, L1 and GIoU box terms on every decoder output.

The main term is the last decoder layer's normal queries. Auxiliary terms repeat it for every other decoder layer and for
the encoder's top-K proposals, each matched on its own; denoising terms score every decoder layer's denoising queries
under the fixed matching they were built with. The total is the plain sum (RT-DETR does not scale it by the batch size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from models.heads.rtdetr import DenoisingMeta, DETROutput
from utils.boxes import bbox_iou, xywh2xyxy
from utils.loss.schedule import FixedOverTraining

Indices = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, gt indices) of the matched pairs
Tensors = Sequence[torch.Tensor]  # per-image gt boxes or classes
Matched = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (image, query, gt box cxcywh, gt class) per pair

COST_CLASS, COST_L1, COST_GIOU = 2.0, 5.0, 2.0  # matching cost weights
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the matcher's focal-style class cost
VFL_ALPHA, VFL_GAMMA = 0.75, 2.0  # the varifocal loss's down-weighting of negatives
LOG_EPS = 1e-8  # keeps the class cost's logs finite at p = 0 or 1
IOU_EPS = 1e-7  # keeps the pairwise GIoU finite for degenerate boxes


def split_targets(targets: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows [image, class, cx, cy, w, h] -> per image its gt boxes (n_i, 4) cxcywh float32 and classes (n_i,) long."""
    targets = targets.float()
    if targets.shape[0] and not ((targets[:, 0] >= 0) & (targets[:, 0] < batch_size)).all():
        raise ValueError(f"target image indices must lie in [0, {batch_size}), got {targets[:, 0].unique().tolist()}")
    img = targets[:, 0].long()
    rows = [targets[img == i] for i in range(batch_size)]
    return [r[:, 2:6] for r in rows], [r[:, 1].long() for r in rows]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (N, M) of xyxy boxes a (N, 4) and b (M, 4)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return inter / (union + IOU_EPS) - (hull - union) / (hull + IOU_EPS)


def focal_class_cost(logits: torch.Tensor, gt_cls: torch.Tensor) -> torch.Tensor:
    """Focal-style class cost (Q, n) of query logits (Q, nc) for gt classes (n,): positive minus negative focal term."""
    p = logits[:, gt_cls].sigmoid()
    pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -(p + LOG_EPS).log()
    neg = (1 - FOCAL_ALPHA) * p**FOCAL_GAMMA * -(1 - p + LOG_EPS).log()
    return pos - neg


def match_cost(boxes: torch.Tensor, logits: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor) -> torch.Tensor:
    """Matching cost (Q, n) in float32: 2 * class cost + 5 * L1 (cxcywh) - 2 * GIoU (xyxy); non-finite entries are 0."""
    boxes, logits, gt_boxes = boxes.float(), logits.float(), gt_boxes.float()
    cost_l1 = torch.cdist(boxes, gt_boxes, p=1)
    cost_giou = -generalized_box_iou(xywh2xyxy(boxes), xywh2xyxy(gt_boxes))
    cost = COST_CLASS * focal_class_cost(logits, gt_cls) + COST_L1 * cost_l1 + COST_GIOU * cost_giou
    return torch.where(torch.isfinite(cost), cost, torch.zeros_like(cost))


@torch.no_grad()
def hungarian_match(boxes: torch.Tensor, logits: torch.Tensor, gt_boxes: Tensors, gt_cls: Tensors) -> Indices:
    """Per image, the (query, gt) indices of the minimum-cost one-to-one matching, sorted by query index (long, on boxes' device).

    boxes (B, Q, 4) cxcywh, logits (B, Q, nc); gt_boxes[i] (n_i, 4) cxcywh, gt_cls[i] (n_i,). Images without gts get empty
    index tensors. The costs of all images are computed in one go, then solved per image on the CPU with scipy.
    """
    bs, nq = boxes.shape[:2]
    counts = [len(c) for c in gt_cls]
    empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
    if sum(counts) == 0:
        return [(empty, empty) for _ in range(bs)]
    cost = match_cost(boxes.flatten(0, 1), logits.flatten(0, 1), torch.cat(list(gt_boxes)), torch.cat(list(gt_cls)))
    chunks = cost.view(bs, nq, -1).cpu().split(counts, -1)
    from scipy.optimize import linear_sum_assignment  # on first use: scipy.optimize costs ~0.5 s at every script start

    out: Indices = []
    for i, chunk in enumerate(chunks):
        rows, cols = linear_sum_assignment(chunk[i].numpy())
        order = rows.argsort()  # scipy already returns them by row; made explicit as the contract
        out.append((torch.as_tensor(rows[order], device=boxes.device).long(), torch.as_tensor(cols[order], device=boxes.device).long()))
    return out


def denoising_match(dn: DenoisingMeta, counts: Sequence[int]) -> Indices:
    """The fixed matching of the denoising queries: image i's positive[i] against gts arange(n_i) repeated per group."""
    out: Indices = []
    for i, (pos, n) in enumerate(zip(dn.positive, counts)):
        if len(pos) != n * dn.groups:
            raise ValueError(f"image {i}: {len(pos)} positive denoising queries for {n} gts in {dn.groups} groups")
        out.append((pos.long(), torch.arange(n, device=pos.device).repeat(dn.groups)))
    return out


def gather_matched(indices: Indices, gt_boxes: Tensors, gt_cls: Tensors) -> Matched:
    """(image index, query index, gt box (m, 4), gt class (m,)) of every matched pair, concatenated over the images."""
    image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    box = torch.cat([b[g] for b, (_, g) in zip(gt_boxes, indices)])
    cls = torch.cat([c[g] for c, (_, g) in zip(gt_cls, indices)])
    return image, query, box, cls


def varifocal_targets(boxes: torch.Tensor, logits: torch.Tensor, matched: Matched) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU-aware target scores and one-hot labels (B, Q, nc): at each matched (query, gt class) the detached IoU, resp. 1."""
    image, query, box, cls = matched
    score, label = torch.zeros_like(logits), torch.zeros_like(logits)
    iou = bbox_iou(boxes[image, query].detach(), box, xywh=True).clamp(0, 1)
    score[image, query, cls] = iou.to(score.dtype)
    label[image, query, cls] = 1.0
    return score, label


def varifocal_loss(logits: torch.Tensor, score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Element-wise varifocal loss: BCE towards `score`, weighted by the score for positives, 0.75 * p^2 (p detached) else."""
    weight = VFL_ALPHA * logits.detach().sigmoid().pow(VFL_GAMMA) * (1 - label) + score * label
    return F.binary_cross_entropy_with_logits(logits, score, reduction="none") * weight


class DETRLoss(FixedOverTraining):
    """RT-DETR's loss: (DETROutput, targets [image, class, cx, cy, w, h]) -> (total, detached main-layer items)."""

    names: tuple[str, ...] = ("giou_loss", "cls_loss", "l1_loss")

    def __init__(self, nc: int, hyp: Mapping[str, Any]) -> None:
        self.nc = nc
        self.gains = (float(hyp.get("giou", 2.0)), float(hyp.get("cls", 1.0)), float(hyp.get("box", 5.0)))  # names order

    def terms(
        self, boxes: torch.Tensor, logits: torch.Tensor, gt_boxes: Tensors, gt_cls: Tensors, indices: Indices, num_gts: int
    ) -> torch.Tensor:
        """Gain-weighted [GIoU, class, L1] losses (3,) of one query set, boxes (B, Q, 4) and logits (B, Q, nc), under `indices`."""
        boxes, logits = boxes.float(), logits.float()
        norm = max(num_gts, 1)
        matched = gather_matched(indices, gt_boxes, gt_cls)
        image, query, box, _ = matched
        if len(query):
            pred = boxes[image, query]
            l1 = (pred - box).abs().sum() / norm
            giou = (1 - bbox_iou(pred, box, xywh=True, GIoU=True)).sum() / norm
        else:  # zero, but still part of the graph so that backward reaches the boxes
            l1 = giou = boxes.sum() * 0
        score, label = varifocal_targets(boxes, logits, matched)
        cls = varifocal_loss(logits, score, label).mean(1).sum() * logits.shape[1] / norm
        return torch.stack((giou, cls, l1)) * logits.new_tensor(self.gains)

    def matched_terms(self, boxes: torch.Tensor, logits: torch.Tensor, gt_boxes: Tensors, gt_cls: Tensors) -> torch.Tensor:
        """`terms` of one query set under its own Hungarian matching."""
        num_gts = sum(len(c) for c in gt_cls)
        return self.terms(boxes, logits, gt_boxes, gt_cls, hungarian_match(boxes, logits, gt_boxes, gt_cls), num_gts)

    def __call__(self, preds: DETROutput, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss (main + auxiliary + denoising terms) and the main layer's gain-weighted items (3,), detached."""
        boxes, logits = preds.boxes.float(), preds.logits.float()
        if logits.shape[-1] != self.nc:
            raise ValueError(f"the loss was built for {self.nc} classes, the logits have {logits.shape[-1]}")
        gt_boxes, gt_cls = split_targets(targets.to(boxes.device), boxes.shape[1])
        counts = [len(c) for c in gt_cls]
        num_gts = sum(counts)
        num_dn = preds.dn.num_dn if preds.dn is not None else 0
        main = self.matched_terms(boxes[-1, :, num_dn:], logits[-1, :, num_dn:], gt_boxes, gt_cls)
        total = main.sum() + self.matched_terms(preds.enc_boxes.float(), preds.enc_logits.float(), gt_boxes, gt_cls).sum()
        for layer in range(boxes.shape[0] - 1):
            total = total + self.matched_terms(boxes[layer, :, num_dn:], logits[layer, :, num_dn:], gt_boxes, gt_cls).sum()
        if preds.dn is not None and num_gts > 0:
            indices, num_dn_gts = denoising_match(preds.dn, counts), num_gts * preds.dn.groups
            for layer in range(boxes.shape[0]):
                total = total + self.terms(boxes[layer, :, :num_dn], logits[layer, :, :num_dn], gt_boxes, gt_cls, indices, num_dn_gts).sum()
        return total, main.detach()
