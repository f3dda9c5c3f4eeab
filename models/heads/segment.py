"""YOLOv5 instance segmentation head (Segment = Detect + mask coefficients + Proto) and mask assembly from prototypes.

Training output: (per-level raw maps (B, na, ny, nx, 5 + nc + nm), prototypes (B, nm, H/4, W/4)).
Eval output: (decoded (B, N, 5 + nc + nm) with raw mask coefficients last, prototypes, per-level raw maps).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks.conv import Conv
from models.heads.base import HeadPolicy, register_head
from models.heads.detect import Detect
from models.registry import register_module


class Proto(nn.Module):
    """Mask prototypes at twice the input's resolution: Conv3x3 -> nearest upsample x2 -> Conv3x3 -> Conv1x1 to c2 maps."""

    def __init__(self, c1: int, c_: int = 256, c2: int = 32) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


@register_head
@register_module("Segment", kind="segment")
class Segment(Detect):
    """Anchor-based Detect whose anchors also predict `nm` raw mask coefficients, plus Proto on the first (stride 8) input."""

    kind: ClassVar[str] = "segment"
    # Two outputs (detections with mask coefficients, prototypes): the formats whose runtime returns both.
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="segment", title="segmentation", hyp_file="hyp.scratch-low.yaml",
        export_formats=("onnx", "torchscript", "openvino", "ncnn", "tflite", "coreml"),
        tta_reason="merged boxes would lose the prototypes their mask coefficients refer to",
    )
    export_layout: ClassVar[str] = "(batch, anchors, 5 + nc + nm)"

    @classmethod
    def output_axes(cls) -> tuple[dict[int, str], ...]:
        """Detections, then the mask prototypes (B, nm, H/4, W/4)."""
        return (*super().output_axes(), {0: "batch", 2: "mask_height", 3: "mask_width"})

    def __init__(
        self, nc: int = 80, anchors: list | tuple = (), nm: int = 32, npr: int = 256, ch: list | tuple = (), strides: list | tuple = ()
    ) -> None:
        super().__init__(nc, anchors, ch, strides, nm=nm)
        self.npr = npr
        self.proto = Proto(ch[0], npr, nm)

    def forward(  # type: ignore[override]  # YOLOv5's Segment layout: prototypes ride along with Detect's outputs
        self, xs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        protos = self.proto(xs[0])
        raw, decoded = self._levels(xs)
        return (raw, protos) if decoded is None else (decoded, protos, raw)


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero each (n, h, w) mask outside its xyxy box (n, 4), given in mask pixels; a pixel is kept when its index lies in [x1, x2)."""
    _, h, w = masks.shape
    x1, y1, x2, y2 = boxes[:, :, None, None].unbind(1)  # each (n, 1, 1)
    cols = torch.arange(w, device=masks.device, dtype=boxes.dtype).view(1, 1, w)
    rows = torch.arange(h, device=masks.device, dtype=boxes.dtype).view(1, h, 1)
    inside = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
    return masks * inside


def masks_from_protos(
    protos: torch.Tensor, coeffs: torch.Tensor, boxes_xyxy: torch.Tensor, shape: tuple[int, int], upsample: bool = False
) -> torch.Tensor:
    """(n, h, w) masks in [0, 1]: sigmoid(coeffs @ protos) cropped to the boxes (input pixels), optionally resized to `shape`."""
    nm, mh, mw = protos.shape
    h, w = shape
    masks = (coeffs.to(protos.dtype) @ protos.reshape(nm, -1)).sigmoid().view(coeffs.shape[0], mh, mw)
    scale = torch.tensor([mw / w, mh / h, mw / w, mh / h], device=boxes_xyxy.device, dtype=boxes_xyxy.dtype)
    masks = crop_to_boxes(masks, boxes_xyxy * scale)
    if upsample:
        masks = F.interpolate(masks[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # n on the batch axis: n = 0 works
    return masks
