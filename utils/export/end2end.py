"""End-to-end exports: NMS inside the graph (ONNX NonMaxSuppression), so a deployed file returns final boxes.

The graph's output is (B, topk_all, 6 + nm) rows [x1, y1, x2, y2, confidence, class, extras...] per image, best first;
rows past the image's last detection are all zeros (confidence 0), so a consumer keeps the rows with confidence > 0.
The nm extras are the head's per-box values after the class scores (a segmentation head's mask coefficients; none for
a detector), and the model's further outputs (its mask prototypes) follow unchanged. Each box keeps its best class only
(detect.py's NMS); val.py's multi-label NMS can keep one box under two classes, so its mAP on an end-to-end export can
be a little lower than on the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torchvision
from torch import nn

from models.heads.base import head_class
from models.model import DetectionModel


@dataclass(frozen=True)
class NMSSettings:
    """What export.py --nms bakes into the graph (YOLOv5's --conf-thres --iou-thres --topk-per-class --topk-all --agnostic-nms)."""

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    topk_per_class: int = 100
    topk_all: int = 100
    agnostic: bool = False

    def check(self) -> None:
        """One ValueError line naming the flag whose value cannot work."""
        for flag, v in (("--conf-thres", self.conf_thres), ("--iou-thres", self.iou_thres)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{flag} must be between 0 and 1, got {v}")
        for flag, n in (("--topk-per-class", self.topk_per_class), ("--topk-all", self.topk_all)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {n!r}")


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_thres: float, conf_thres: float) -> torch.Tensor:
    """ONNX NonMaxSuppression's result computed in PyTorch: (K, 3) int64 [batch, class, box] selected per class, best first."""
    rows = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            idx = (s > conf_thres).nonzero()[:, 0]
            keep = idx[torchvision.ops.nms(boxes[b, idx], s[idx], iou_thres)[:max_per_class]]
            rows.append(torch.stack((torch.full_like(keep, b), torch.full_like(keep, c), keep), 1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)


class _NonMaxSuppression(torch.autograd.Function):
    """Per-class NMS that exports as one ONNX NonMaxSuppression node (and runs torchvision's NMS in PyTorch)."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_thres: float,
                conf_thres: float) -> torch.Tensor:
        return reference_nms(boxes, scores, max_per_class, iou_thres, conf_thres)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_class: int, iou_thres: float, conf_thres: float) -> Any:
        limit = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_thres], dtype=torch.float32))
        conf = g.op("Constant", value_t=torch.tensor([conf_thres], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, limit, iou, conf, center_point_box_i=0)


def _top_per_image(rows: torch.Tensor, owner: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """(K, 6 + nm) selected rows and their image index -> (B, k, 6 + nm), each image's k best rows, zero rows where it has fewer."""
    pad = rows.new_zeros((k, rows.shape[1]))
    pad[:, 4] = -1.0  # padding ranks below every real row and belongs to every image
    rows = torch.cat((rows, pad))
    owner = torch.cat((owner, owner.new_full((k,), -1)))
    images = torch.arange(batch, device=rows.device)[:, None]
    mine = (owner[None] == images) | (owner[None] == -1)
    ranked = torch.where(mine, rows[:, 4][None], rows.new_full((1,), -2.0))
    best = ranked.topk(k, dim=1).indices  # (B, k)
    out = rows[best]
    return out * (out[..., 4:5] > 0).to(out.dtype)


class _AfterModel(nn.Module):
    """A detector followed by an NMS stage: keeps the model, the checked NMS settings and its head's output split."""

    def __init__(self, model: nn.Module, settings: NMSSettings) -> None:
        super().__init__()
        settings.check()
        self.model, self.settings = model, settings
        head = head_class(str(model.head_kind))
        self.split_output, self.inference_outputs = head.split_output, head.inference_outputs
        self.nm = int(getattr(cast(Any, model).head, "nm", 0))  # extra values per box after the class scores (mask coefficients)
        self.eval()

    def decoded(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """The head's (boxes (B, N, 4) xyxy, scores (B, N, nc), extras (B, N, nm)) and its further outputs (prototypes)."""
        out = self.inference_outputs(self.model(x))
        pred, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, ())
        return self.split_output(pred, self.nm), rest


class End2End(_AfterModel):
    """A detector's decoded output followed by NMS and top-k: (B, 3, H, W) -> (B, topk_all, 6 + nm) final detections,
    followed by the model's further outputs unchanged (a segmentation model's prototypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        s = self.settings
        (boxes, scores, extras), rest = self.decoded(x)
        best, cls = scores.max(2)  # one class per box, as detect.py's NMS (multi_label off)
        if s.agnostic:
            per_class = best[:, None]  # (B, 1, N): one NMS over all classes
        else:  # (B, nc, N) with each box's score in its best class only, so per-class NMS never keeps a box twice
            per_class = torch.zeros_like(scores).scatter(2, cls[..., None], best[..., None]).transpose(1, 2).contiguous()
        args = (boxes.contiguous(), per_class, s.topk_per_class, s.iou_thres, s.conf_thres)
        # ONNX gets one NonMaxSuppression node; TorchScript traces torchvision's NMS (loops over the traced batch and classes)
        sel = _NonMaxSuppression.apply(*args) if torch.onnx.is_in_onnx_export() else reference_nms(*args)
        b, c, i = sel[:, 0], sel[:, 1], sel[:, 2]
        label = cls[b, i] if s.agnostic else c
        columns = [boxes[b, i], per_class[b, c, i][:, None], label[:, None].to(boxes.dtype)]
        if self.nm:  # a zero-width gather would break the ONNX exporter's shape arithmetic (division by zero)
            columns.append(extras[b, i])
        rows = torch.cat(columns, 1)
        final = _top_per_image(rows, b, x.shape[0], s.topk_all)
        return (final, *rest) if rest else final


class DetectionOutputInputs(_AfterModel):
    """What ncnn's DetectionOutput layer (its in-graph per-class NMS) reads: (boxes (B, N, 4), scores (B, N, 1 + nc),
    priors (B, 2, 4N)); utils/export/ncnn.py appends that layer to the converted graph.

    Scores keep each box's best class only (detect.py's NMS); column 0 is the background class, which the layer skips.
    The priors' first row is the boxes themselves and the second their variances, zero, so the layer's centre-size
    decode returns each prior unchanged (the first blob is then unused). Exact score ties keep both classes.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (boxes, scores, _), _ = self.decoded(x)  # (B, N, 4) xyxy, (B, N, nc)
        best = scores.amax(2, keepdim=True)
        # 1 where a score is its box's maximum, else 0, with ops ncnn has (no comparisons): ceil(d) >= 1 for any d > 0
        only_best = scores * (1 - torch.clamp(torch.ceil(best - scores), max=1.0))
        return detection_output_inputs(boxes, only_best)


class RankingInputs(nn.Module):
    """A final-rows head's top-k left to ncnn's DetectionOutput layer (ncnn has no TopK): every (box, class) score of
    what the head ranks, laid out as DetectionOutputInputs; with IoU threshold 1 the layer suppresses nothing and keeps
    the best (box, class) pairs, which is the head's own top-k."""

    def __init__(self, model: DetectionModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores = self.model.head.ranking_inputs(self.model(x)[1])
        return detection_output_inputs(boxes, scores)


def detection_output_inputs(boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 4) boxes and (B, N, nc) scores -> ncnn DetectionOutput's (boxes, scores with a zero background column 0,
    priors (B, 2, 4N): the boxes and zero variances, so the layer's decode returns each box unchanged)."""
    flat = boxes.reshape(boxes.shape[0], 1, -1)
    return boxes, torch.cat((scores[..., :1] * 0, scores), 2), torch.cat((flat, flat * 0), 1)
