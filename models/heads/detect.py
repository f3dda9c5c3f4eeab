"""YOLOv5's anchor-based Detect head: three levels of anchors, sigmoid xy/wh decoding, objectness."""

from __future__ import annotations

import logging
import math
from typing import ClassVar, cast

import torch
from torch import nn

from models.heads.base import Head, HeadPolicy, check_output_width, register_head, xywh_to_xyxy
from models.registry import register_module

LOGGER = logging.getLogger("mobile_yolo")


@register_head
@register_module("Detect", kind="detect", without_anchors="AnchorFreeDetect")
class Detect(Head):
    """Anchor-based head: one 1x1 conv per level; raw maps in training, decoded pixel boxes in eval."""

    kind: ClassVar[str] = "anchor_based"
    export_layout: ClassVar[str] = "(batch, anchors, 5 + nc)"
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="detect", title="YOLOv5 Detect", hyp_file="hyp.scratch-low.yaml", evolve_table="anchor_based"
    )

    anchors: torch.Tensor  # buffer, declared for the type checker

    def __init__(
        self, nc: int = 80, anchors: list | tuple = (), ch: list | tuple = (), strides: list | tuple = (), *, nm: int = 0
    ) -> None:
        """`nm` extra raw (never sigmoided) outputs per anchor follow the class scores, e.g. Segment's mask coefficients."""
        super().__init__()
        if len(strides) != len(anchors) or len(ch) != len(anchors):
            raise ValueError(f"{type(self).__name__}: {len(anchors)} anchor levels, {len(ch)} inputs and {len(strides)} strides must agree")
        self.nc = nc
        self.nm = nm
        self.no = nc + 5 + nm
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.level_strides = tuple(float(s) for s in strides)  # Python copy: building works on the meta device
        stride = torch.tensor(self.level_strides)
        pixels = torch.tensor(_order_anchors([list(map(float, a)) for a in anchors], self.level_strides), dtype=torch.float32)
        self.register_buffer("stride", stride, persistent=False)
        self.register_buffer("anchors", pixels.view(self.nl, -1, 2) / stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._initialize_biases()

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        """YOLOv5 priors: ~8 objects per 640 image for objectness, 0.6/(nc-0.99) for classes."""
        for conv, s in zip(self.m, self.level_strides):
            b = cast(torch.Tensor, cast(nn.Conv2d, conv).bias).view(self.na, -1)  # head convs are built with bias=True
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw, decoded = self._levels(xs)
        return raw if decoded is None else (decoded, raw)

    def _levels(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-level raw maps (B, na, ny, nx, no), and in eval mode all levels decoded into one (B, N, no) tensor."""
        raw, decoded = [], []
        for i in range(self.nl):
            p = self.m[i](xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                decoded.append(self._decode(p, i))
        return raw, None if self.training else torch.cat(decoded, 1)

    def _decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Map one level's raw output to (B, na*ny*nx, no) xywh pixels + sigmoid scores (+ the nm extras, raw)."""
        bs, na, ny, nx, no = p.shape
        ys = torch.arange(ny, device=p.device, dtype=p.dtype)
        xs = torch.arange(nx, device=p.device, dtype=p.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, na, 1, 1, 2).to(p.dtype)
        y = p.sigmoid() if not self.nm else torch.cat((p[..., : -self.nm].sigmoid(), p[..., -self.nm :]), 4)
        xy, wh, rest = y.split((2, 2, no - 4), 4)  # rest: objectness, classes (and the nm raw extras)
        xy = (xy * 2 + grid) * self.stride[i].to(p.dtype)
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, rest), 4).reshape(bs, -1, no)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 5 + nc + nm) xywh + objectness + classes -> (xyxy boxes, cls * obj scores, the nm extra columns)."""
        check_output_width(pred, 2, 6 + nm, "(batch, anchors, 5 + nc)")
        nc = pred.shape[2] - 5 - nm
        return xywh_to_xyxy(pred[..., :4]), pred[..., 5 : 5 + nc] * pred[..., 4:5], pred[..., 5 + nc :]


def _order_anchors(anchors: list[list[float]], strides: tuple[float, ...]) -> list[list[float]]:
    """Flip the anchor levels if their mean area order disagrees with the stride order."""
    area = [sum(a[k] * a[k + 1] for k in range(0, len(a) - 1, 2)) / max(len(a) // 2, 1) for a in anchors]
    if len(area) > 1 and _sign(area[-1] - area[0]) != _sign(strides[-1] - strides[0]):
        LOGGER.info("Detect: reversing anchor order to match strides")
        return anchors[::-1]
    return anchors


def _sign(x: float) -> int:
    """-1, 0 or 1, as torch.sign."""
    return (x > 0) - (x < 0)
