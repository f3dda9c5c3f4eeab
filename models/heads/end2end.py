"""End-to-end (NMS-free) anchor-free head in the YOLOv10/YOLO26 form: a one-to-many branch that trains the network and a
one-to-one branch, on detached features, whose top-k positions are the final detections.

Inference reads the one-to-one branch only and ranks (position, class) pairs by score: the output is final rows
(B, max_det, 6) [x1, y1, x2, y2, score, class] in input pixels, the layout of exports with NMS inside, so no format
needs NMS. `reparameterize()` (model.fuse()) drops the one-to-many branch, which inference never reads.
"""

from __future__ import annotations

import copy
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from models.blocks.conv import Conv, DWConv
from models.heads.anchor_free import AnchorFreeDetect
from models.heads.anchor_points import dist2bbox, make_anchors
from models.heads.base import HeadPolicy, register_head
from models.registry import register_module
from models.reparam import reparameterize_model


class End2EndOutput(NamedTuple):
    """Raw per-level maps (B, 4 * reg_max + nc, H, W) of both branches; one2many is empty once the head is fused."""

    one2many: list[torch.Tensor]
    one2one: list[torch.Tensor]


def topk_detections(boxes: torch.Tensor, scores: torch.Tensor, max_det: int) -> torch.Tensor:
    """(B, N, 4) xyxy boxes and (B, N, nc) scores -> (B, k, 6) rows of the k best (position, class) pairs, best first.

    k = min(max_det, N). The best k pairs always lie among the k positions of highest best-class score (a pair's
    position outranks every position below that pair's score), so ranking those positions first gives the same rows
    with a small second top-k.
    """
    nc = scores.shape[-1]
    k = min(max_det, scores.shape[1])
    pos = scores.amax(-1).topk(k, dim=1).indices  # (B, k)
    scores = scores.gather(1, pos[..., None].expand(-1, -1, nc))
    boxes = boxes.gather(1, pos[..., None].expand(-1, -1, 4))
    top, flat = scores.flatten(1).topk(k, dim=1)  # (B, k) over the k * nc pairs, pair index = position * nc + class
    pair_boxes = boxes[:, :, None].expand(-1, -1, nc, -1).flatten(1, 2)  # (B, k * nc, 4): gathered by the pair index itself
    boxes = pair_boxes.gather(1, flat[..., None].expand(-1, -1, 4))
    cls = flat % nc
    return torch.cat((boxes, top[..., None], cls[..., None].to(boxes.dtype)), -1)


@register_head
@register_module("End2EndDetect", kind="head")
class End2EndDetect(AnchorFreeDetect):
    """YOLOv10/YOLO26-style head: AnchorFreeDetect's branches (cv2, cv3: one-to-many) plus copies (one2one_cv2,
    one2one_cv3) fed with detached features. reg_max 1 regresses each box side directly (YOLO26: no DFL); the class
    branch is YOLO11/YOLO26's depthwise-separable one.

    Training returns End2EndOutput; eval returns ((B, k, 6) final rows, End2EndOutput), k = min(max_det, positions).
    """

    kind: ClassVar[str] = "end2end"  # also the name of the final-rows layout (utils.nms.END2END) its output has
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="detect", title="end-to-end", hyp_file="hyp.scratch-af.yaml", evolve_table="anchor_free", dynamic_export=False,
        export_formats=("onnx", "torchscript", "openvino", "ncnn", "coreml", "tflite"),
        nms_export=False, nms_reason="the end-to-end head's output is already final (one box per object, no NMS); export without --nms",
        tta_reason="its one-to-one output ranks one box per object and has no NMS to merge augmented passes with",
    )
    export_layout: ClassVar[str] = "(batch, max_det, 6)"
    anchor_axis: ClassVar[int] = 1
    nms_free: ClassVar[bool] = True
    final_rows_output: ClassVar[bool] = True
    yaml_args: ClassVar[tuple[str, ...]] = ("nc", "reg_max", "max_det")

    def __init__(
        self, nc: int = 80, ch: list | tuple = (), strides: list | tuple = (), reg_max: int = 1, max_det: int = 300
    ) -> None:
        super().__init__(nc, ch, strides, reg_max)
        self.max_det = int(max_det)
        self.one2one_cv2, self.one2one_cv3 = copy.deepcopy(self.cv2), copy.deepcopy(self.cv3)  # same start, own weights

    @staticmethod
    def class_branch(c1: int, c_mid: int, nc: int) -> nn.Sequential:
        """YOLO11/YOLO26's lighter class branch: two (depthwise 3x3, pointwise 1x1) pairs, then the 1x1 logits conv."""
        return nn.Sequential(DWConv(c1, c1, 3), Conv(c1, c_mid, 1), DWConv(c_mid, c_mid, 3), Conv(c_mid, c_mid, 1), nn.Conv2d(c_mid, nc, 1))

    @property
    def max_detections(self) -> int | None:
        """At most max_det rows per image (the yaml's max_det argument)."""
        return self.max_det

    @classmethod
    def output_axes(cls) -> tuple[dict[int, str], ...]:
        """Batch is the only free axis: the number of rows is max_det (or every position, when there are fewer)."""
        return ({0: "batch"},)

    def forward(self, xs: list[torch.Tensor]) -> End2EndOutput | tuple[torch.Tensor, End2EndOutput]:  # type: ignore[override]
        one2one = [torch.cat((self.one2one_cv2[i](x.detach()), self.one2one_cv3[i](x.detach())), 1) for i, x in enumerate(xs)]
        fused = len(self.cv2) == 0
        one2many = [] if fused else [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
        raw = End2EndOutput(one2many, one2one)
        return raw if self.training else (self.final_rows(one2one), raw)

    def final_rows(self, one2one: list[torch.Tensor]) -> torch.Tensor:
        """One-to-one maps -> (B, k, 6) [x1, y1, x2, y2, score, class] in input pixels, best first; no NMS."""
        return topk_detections(*self._decode(one2one), self.max_det)

    def ranking_inputs(self, raw: End2EndOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw eval output -> what the top-k ranks: (B, N, 4) xyxy boxes in input pixels, (B, N, nc) class scores."""
        return self._decode(raw.one2one)

    def _decode(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level one-to-one maps -> (B, N, 4) xyxy pixel boxes and (B, N, nc) class probabilities."""
        flat = torch.cat([r.flatten(2) for r in maps], 2)
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        points, point_stride = make_anchors(maps, self.level_strides)
        xyxy = dist2bbox(self.dfl(box), points.transpose(0, 1).unsqueeze(0), xywh=False, dim=1) * point_stride.transpose(0, 1)
        return xyxy.transpose(1, 2), cls.sigmoid().transpose(1, 2)

    def reparameterize(self) -> None:
        """Inference form: fold each Conv's BatchNorm and drop the one-to-many branch (inference reads only one-to-one)."""
        self.cv2, self.cv3 = nn.ModuleList(), nn.ModuleList()
        for child in self.children():
            reparameterize_model(child)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Not defined: the output is final rows, read as they are (utils.nms.filter_final), with no class score table."""
        raise ValueError("End2EndDetect's output (batch, max_det, 6) holds final detections; read it with filter_final, not split_output")
