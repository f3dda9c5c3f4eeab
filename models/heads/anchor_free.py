"""YOLOv8-style anchor-free head: per-level box (distribution over distance bins) and class branches, decoded with DFL."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import nn

from models.blocks.conv import Conv
from models.heads.anchor_points import dist2bbox, make_anchors
from models.heads.base import Head, HeadPolicy, check_output_width, register_head, xywh_to_xyxy
from models.registry import register_module


class DFL(nn.Module):
    """Distribution focal loss decoder: per box side, softmax over `reg_max` bins then the expected bin index.

    The expectation is a frozen 1x1 conv with weights 0..reg_max-1 (its reg_max weights count as parameters, never train).
    """

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4 * reg_max, N) bin logits -> (B, 4, N) distances in grid units."""
        b, _, n = x.shape
        probs = x.view(b, 4, self.reg_max, n).transpose(1, 2).softmax(1)  # bins on the channel axis for the conv
        return self.conv(probs).view(b, 4, n)


def _branch(c1: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Conv3x3(c1, c_mid) -> Conv3x3(c_mid, c_mid) -> plain 1x1 conv with bias to `c_out` channels."""
    return nn.Sequential(Conv(c1, c_mid, 3), Conv(c_mid, c_mid, 3), nn.Conv2d(c_mid, c_out, 1))


@register_head
@register_module("AnchorFreeDetect", kind="head")
class AnchorFreeDetect(Head):
    """Anchor-free head: per level a box branch (cv2, 4 * reg_max distance bins) and a class branch (cv3, nc logits).

    Training returns one (B, 4 * reg_max + nc, H, W) map per level (box channels first); eval returns
    ((B, 4 + nc, N) decoded xywh pixel boxes + class sigmoids, the training maps), N = sum of H * W.
    """

    kind: ClassVar[str] = "anchor_free"
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="detect", title="anchor-free", hyp_file="hyp.scratch-af.yaml", evolve_table="anchor_free"
    )
    export_layout: ClassVar[str] = "(batch, 4 + nc, anchors)"
    anchor_axis: ClassVar[int] = 2

    def __init__(self, nc: int = 80, ch: list | tuple = (), strides: list | tuple = (), reg_max: int = 16) -> None:
        super().__init__()
        if not ch or len(ch) != len(strides):
            raise ValueError(f"AnchorFreeDetect: {len(ch)} inputs and {len(strides)} strides must agree (and be at least one)")
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = 4 * reg_max + nc
        self.register_buffer("stride", torch.tensor([float(s) for s in strides]), persistent=False)
        self.level_strides = tuple(float(s) for s in strides)  # Python copy: decode works on meta tensors (FLOP count)
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(_branch(c, c2, 4 * reg_max) for c in ch)
        self.cv3 = nn.ModuleList(self.class_branch(c, c3, nc) for c in ch)
        self.dfl: nn.Module = DFL(reg_max) if reg_max > 1 else nn.Identity()
        self._initialize_biases()

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        """Box logits start at 2.0; class logits at the prior of ~5 objects per 640x640 image spread over the level's cells."""
        for box, cls, s in zip(self.cv2, self.cv3, self.level_strides):
            box_conv, cls_conv = cast(nn.Sequential, box)[-1], cast(nn.Sequential, cls)[-1]  # plain Conv2d built with bias
            cast(torch.Tensor, box_conv.bias).fill_(2.0)
            cast(torch.Tensor, cls_conv.bias).fill_(math.log(5 / self.nc / (640 / s) ** 2))

    @staticmethod
    def class_branch(c1: int, c_mid: int, nc: int) -> nn.Sequential:
        """The per-level class branch (YOLOv8's: two 3x3 Convs, then the 1x1 logits conv)."""
        return _branch(c1, c_mid, nc)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw = [torch.cat((self.cv2[i](xs[i]), self.cv3[i](xs[i])), 1) for i in range(self.nl)]
        return raw if self.training else (self.decode(raw), raw)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Per-level maps -> (B, 4 + nc, N): xywh boxes in input pixels and class probabilities.

        Anchor points are recomputed from the maps' shapes on every call, so traced/exported graphs follow any input size.
        """
        flat = torch.cat([r.flatten(2) for r in raw], 2)
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        points, point_stride = make_anchors(raw, self.level_strides)
        boxes = dist2bbox(self.dfl(box), points.transpose(0, 1).unsqueeze(0), xywh=True, dim=1) * point_stride.transpose(0, 1)
        return torch.cat((boxes, cls.sigmoid()), 1)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4 + nc + nm, N) xywh + class scores -> (xyxy boxes, class scores, the nm extra rows), all (B, N, .)."""
        check_output_width(pred, 1, 5 + nm, "(batch, 4 + nc, anchors)")
        nc = pred.shape[1] - 4 - nm
        p = pred.transpose(1, 2)
        return xywh_to_xyxy(p[..., :4]), p[..., 4 : 4 + nc], p[..., 4 + nc :]
