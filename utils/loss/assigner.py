"""Task-Aligned assignment (TOOD): which anchor points learn which ground-truth box, and with what soft class target.

Definitions used here (all per image, vectorised over the batch with padded ground truths):
- a point is *inside* a gt when its centre is more than `eps` from every edge of the gt box;
- alignment metric = score_of_gt_class^alpha * IoU(pred, gt)^beta, with plain IoU (see `pairwise_iou`);
- a gt's *candidates* are its inside points of positive metric whose metric is at least its k-th largest metric
  (points tied with the k-th are all kept, so the result does not depend on the tie order of a top-k kernel);
  zero-metric points are left out: their soft target, metric / max metric, is 0, so they would carry no weight;
- a point that is a candidate of several gts keeps the one (of those) with the highest IoU, the lowest index on ties;
- soft target of a positive point = one-hot(gt class) * metric / (max metric + eps) * max IoU, the max taken over the
  final positives of its gt.
"""

from __future__ import annotations

import torch


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Plain IoU of every xyxy box of (B, M, 4) against every one of (B, N, 4), shape (B, M, N); eps keeps 0/0 finite."""
    a, b = boxes1[:, :, None], boxes2[:, None]
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Whether each (N, 2) point lies more than eps inside each (B, M, 4) xyxy box, bool (B, M, N)."""
    p = points[None, None]
    margins = torch.cat((p - boxes[:, :, None, :2], boxes[:, :, None, 2:] - p), -1)
    return margins.amin(-1) > eps


class TaskAlignedAssigner:
    """Assigns anchor points to padded ground truths by the task-alignment metric; see the module docstring."""

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9) -> None:
        if topk < 1 or num_classes < 1:
            raise ValueError(f"topk and num_classes must be positive, got {topk} and {num_classes}")
        self.topk, self.num_classes, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        mask_gt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets per point: labels (B, N), xyxy boxes (B, N, 4), soft scores (B, N, nc), fg mask (B, N), gt index (B, N).

        Inputs: sigmoid scores (B, N, nc), predicted xyxy boxes (B, N, 4), points (N, 2), gt classes (B, M, 1),
        gt xyxy boxes (B, M, 4) and the validity of each padded gt (B, M, 1), boxes and points in the same units.
        Background points get label num_classes, a zero box, zero scores and gt index 0.
        """
        bs, n = pred_scores.shape[:2]
        if gt_boxes.shape[1] == 0:
            return self._background(pred_scores)
        labels = gt_labels.view(bs, -1).long().clamp(0, self.num_classes - 1)  # padded rows may hold anything
        metric, iou = self._alignment(pred_scores, pred_boxes, anchor_points, labels, gt_boxes, mask_gt.view(bs, -1).bool())
        pos, gt_idx = self._select(metric, iou)
        fg = pos.any(1)
        max_metric = (metric * pos).amax(-1, keepdim=True)
        max_iou = (iou * pos).amax(-1, keepdim=True)
        norm = ((metric * pos) / (max_metric + self.eps) * max_iou).amax(1)  # (B, N): at most one non-zero term
        target_labels = labels.gather(1, gt_idx)
        target_scores = torch.nn.functional.one_hot(target_labels, self.num_classes).to(norm.dtype) * (norm * fg)[..., None]
        target_boxes = torch.where(fg[..., None], gt_boxes.gather(1, gt_idx[..., None].expand(bs, n, 4)), 0.0)
        target_labels = torch.where(fg, target_labels, torch.full_like(target_labels, self.num_classes))
        return target_labels, target_boxes, target_scores, fg, gt_idx * fg

    def _alignment(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment metric and IoU of every (gt, point) pair, (B, M, N) each, zero unless the point is inside a valid gt."""
        inside = points_in_boxes(anchor_points, gt_boxes, self.eps) & valid[..., None]
        iou = torch.where(inside, pairwise_iou(gt_boxes, pred_boxes, self.eps), 0.0)  # where: padded rows may be inf/nan
        index = labels[..., None].expand(-1, -1, pred_scores.shape[1])
        score = pred_scores.transpose(1, 2).gather(1, index)  # (B, M, N): each point's score for the gt's class
        return torch.where(inside, score.pow(self.alpha) * iou.pow(self.beta), 0.0), iou

    def _select(self, metric: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final positives, bool (B, M, N), and each point's owning gt (B, N): top-k candidates, then the best-IoU claimant."""
        k = min(self.topk, metric.shape[-1])
        kth = metric.topk(k, dim=-1).values[..., -1:]
        cand = (metric >= kth) & (metric > 0)
        best = torch.where(cand, iou, torch.full_like(iou, -1.0)).argmax(1, keepdim=True)  # first index on ties
        owner = torch.arange(metric.shape[1], device=metric.device)[None, :, None] == best
        return cand & owner, best.squeeze(1)

    def _background(self, pred_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The all-background result, for a batch without any ground truth (M = 0)."""
        bs, n = pred_scores.shape[:2]
        dev = pred_scores.device
        labels = torch.full((bs, n), self.num_classes, dtype=torch.long, device=dev)
        zeros_idx = torch.zeros((bs, n), dtype=torch.long, device=dev)
        boxes = torch.zeros((bs, n, 4), dtype=pred_scores.dtype, device=dev)
        return labels, boxes, torch.zeros_like(pred_scores), zeros_idx.bool(), zeros_idx
