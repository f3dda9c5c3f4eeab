"""Anchor-point geometry of anchor-free heads: cell-centre points per level and box <-> distance conversions."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_anchors(
    feats: Sequence[torch.Tensor], strides: Sequence[float] | torch.Tensor, offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level in grid units, (N, 2) as (x, y), and each point's stride, (N, 1); N = sum of H*W."""
    points, stride_col = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[-2:]
        ys = torch.arange(h, device=f.device, dtype=f.dtype) + offset
        xs = torch.arange(w, device=f.device, dtype=f.dtype) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(s), device=f.device, dtype=f.dtype))
    return torch.cat(points), torch.cat(stride_col)


def dist2bbox(distance: torch.Tensor, points: torch.Tensor, xywh: bool = True, dim: int = -1) -> torch.Tensor:
    """Boxes from (left, top, right, bottom) distances to their anchor points: xywh (centre) or xyxy."""
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = points - lt, points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def bbox2dist(points: torch.Tensor, boxes: torch.Tensor, max_dist: float) -> torch.Tensor:
    """(left, top, right, bottom) distances from anchor points to xyxy boxes, clipped to [0, max_dist]."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((points - x1y1, x2y2 - points), -1).clamp(0, max_dist)
