"""Non-maximum suppression turning raw detector output into per-image (n, 6) detections."""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence, Union

import torch

from models.heads.base import LEGACY_HEAD_KIND, head_class

LOGGER = logging.getLogger("mobile_yolo")

Prediction = Union[torch.Tensor, Sequence]
END2END = "end2end"  # the layout of exports with NMS inside (export.py --nms): (B, topk, 6) final rows, zero-padded


def _check_args(conf_thres: float, iou_thres: float, max_det: int) -> None:
    """Reject thresholds outside [0, 1] and non-positive limits early, with a clear message."""
    if not 0.0 <= conf_thres <= 1.0:
        raise ValueError(f"non_max_suppression: conf_thres={conf_thres} must be in [0, 1]")
    if not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"non_max_suppression: iou_thres={iou_thres} must be in [0, 1]")
    if max_det < 1:
        raise ValueError(f"non_max_suppression: max_det={max_det} must be >= 1")


def _unwrap(prediction: Prediction) -> torch.Tensor:
    """Accept the eval-mode (pred, raw) tuple as well as the bare inference tensor."""
    if isinstance(prediction, (list, tuple)):
        if not prediction:
            raise ValueError("non_max_suppression: empty prediction sequence")
        prediction = prediction[0]
    if not isinstance(prediction, torch.Tensor) or prediction.ndim != 3:
        shape = tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction).__name__
        raise ValueError(f"non_max_suppression: expected a 3-d tensor such as (B, N, 5+nc) from an eval-mode model, got {shape}")
    return prediction


def _candidates(boxes: torch.Tensor, scores: torch.Tensor, extras: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """One image's boxes (N, 4), class scores (N, nc) and extras (N, k) -> (n, 6 + k) rows xyxy, conf, cls, extras."""
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        return torch.cat((boxes[i], scores[i, j, None], j[:, None].to(boxes.dtype), extras[i]), 1)
    conf, j = scores.max(1, keepdim=True)
    keep = conf[:, 0] > conf_thres
    return torch.cat((boxes, conf, j.to(boxes.dtype), extras), 1)[keep]


def batched_nms_kernel() -> Any:
    """torchvision's NMS kernel, imported on first use: importing torchvision costs about a second (it loads torch._dynamo),
    which every script start would pay, --help and one-line refusals included."""
    from torchvision.ops import nms

    return nms


def non_max_suppression(
    prediction: Prediction,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
    max_wh: int = 7680,
    head: str | None = None,
    nm: int = 0,
) -> list[torch.Tensor]:
    """Filter by confidence and suppress overlaps per class; one (n, 6 + nm) [x1, y1, x2, y2, conf, cls, extras] per image.

    `head` names the output layout (a head kind: "anchor_based", YOLOv5's (B, N, 5+nc), when None); the head's own
    split_output turns it into boxes, final class scores and `nm` extra values per box (mask coefficients). END2END
    output was suppressed inside the exported graph, and NMS-free heads (RT-DETR) predict one box per object: for both
    only the confidence, class and max_det filters apply (iou_thres, agnostic and multi_label are unused).
    """
    _check_args(conf_thres, iou_thres, max_det)
    prediction = _unwrap(prediction)
    if head == END2END:
        return filter_final(prediction, conf_thres, classes, max_det, nm)
    layout = head_class(head or LEGACY_HEAD_KIND)
    # Work in float32: fp16 cannot represent the class offsets (cls * max_wh) exactly.
    boxes, scores, extras = layout.split_output(prediction.detach().float(), nm)
    if layout.nms_free:
        return rank_queries(boxes, scores, conf_thres, classes, max_det, prediction.dtype)
    bs, nc = boxes.shape[0], scores.shape[-1]
    multi_label = multi_label and nc > 1
    cls_filter = None if classes is None else torch.tensor(list(classes), device=boxes.device, dtype=boxes.dtype)
    time_limit, t0 = 0.5 + 0.05 * bs, time.time()
    output = []
    for xi in range(bs):
        x = _candidates(boxes[xi], scores[xi], extras[xi], conf_thres, multi_label)
        if cls_filter is not None and x.shape[0]:
            x = x[(x[:, 5:6] == cls_filter).any(1)]
        if not x.shape[0]:
            output.append(prediction.new_zeros((0, 6 + nm)))
            continue
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        offsets = x[:, 5:6] * (0 if agnostic else max_wh)
        keep = batched_nms_kernel()(x[:, :4] + offsets, x[:, 4], iou_thres)[:max_det]
        output.append(x[keep].to(prediction.dtype))
    if time.time() - t0 > time_limit:  # warn only: dropping images would silently corrupt validation
        LOGGER.warning(f"WARNING: NMS took {time.time() - t0:.3f}s for {bs} images (soft limit {time_limit:.3f}s)")
    return output


def filter_final(
    prediction: torch.Tensor, conf_thres: float, classes: Sequence[int] | None, max_det: int, nm: int = 0
) -> list[torch.Tensor]:
    """(B, K, 6 + nm) already-suppressed rows (zero rows are padding; nm mask coefficients last) -> per image the rows
    above conf_thres, of `classes`."""
    if prediction.shape[-1] != 6 + nm:
        shape = tuple(prediction.shape)
        raise ValueError(f"non_max_suppression: an end-to-end output with nm={nm} has {6 + nm} values per row, got shape {shape}")
    output = []
    for x in prediction.detach():
        keep = x[:, 4] > conf_thres
        if classes is not None:
            keep &= (x[:, 5:6] == torch.tensor(list(classes), device=x.device, dtype=x.dtype)).any(1)
        output.append(x[keep][:max_det])
    return output


def rank_queries(
    boxes: torch.Tensor, scores: torch.Tensor, conf_thres: float, classes: Sequence[int] | None, max_det: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """An NMS-free head's (B, Q, 4) boxes and (B, Q, nc) scores -> per image (n, 6) rows, each query as its best class,
    above conf_thres and in `classes`, highest score first, at most max_det."""
    conf, cls = scores.max(-1)
    output = []
    for b, c, k in zip(boxes, conf, cls):
        keep = c > conf_thres
        if classes is not None:
            keep &= torch.isin(k, torch.tensor(list(classes), device=k.device))
        rows = torch.cat((b, c[:, None], k[:, None].to(b.dtype)), 1)[keep]
        output.append(rows[rows[:, 4].argsort(descending=True)[:max_det]].to(dtype))
    return output
