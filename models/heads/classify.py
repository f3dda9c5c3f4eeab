"""Image classification head (YOLOv5's Classify, timm's MobileNetV4 and MobileOne tails).

One yaml row covers the three published tails, arguments [nc, hidden, pool_first]:
- YOLOv5 (`yolov5s-cls`): [nc] = [nc, 1280, 0]: 1x1 Conv (conv + BN + act) to 1280, global average pool, linear.
- timm MobileNetV4: [nc, 1280, 1]: global average pool, then the 1x1 conv + BN + act to 1280, then linear.
- MobileOne: [nc, 0]: global average pool, linear (hidden 0 = no hidden conv).
The hidden conv's activation is the config's `activation` key (SiLU without one), as YOLOv5's Conv.default_act.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.blocks.conv import Act, Conv
from models.heads.base import Head, HeadPolicy, register_head
from models.registry import register_module

DEFAULT_HIDDEN = 1280  # YOLOv5's Classify width, also timm's MobileNetV4 head width


@register_head
@register_module("Classify", kind="head", takes_act=True)
class Classify(Head):
    """Classification head on one feature map: training returns logits (B, nc), eval returns softmax probabilities (B, nc)."""

    kind: ClassVar[str] = "classify"
    # YOLOv5's classify/train.py recipe (Adam, data/hyps/hyp.cls.yaml); a (batch, nc) probability tensor has no boxes for NMS,
    # and the NCNN, TFLite and CoreML writers post-process box outputs.
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="classify", title="classification", hyp_file="hyp.cls.yaml", optimizer="Adam", nms_export=False,
        export_formats=("onnx", "torchscript", "openvino"),
        nms_reason="a classifier outputs class probabilities, not boxes; export without --nms",
        tta_reason="TTA merges boxes from several scales and a classifier has none",
    )
    export_layout: ClassVar[str] = "(batch, nc)"
    yaml_args: ClassVar[tuple[str, ...]] = ("nc", "hidden", "pool_first")
    yaml_zero_ok: ClassVar[tuple[str, ...]] = ("hidden", "pool_first")  # models/parse.py lets these be 0

    def __init__(
        self, nc: int = 1000, ch: list | tuple = (), strides: list | tuple = (), hidden: int = DEFAULT_HIDDEN, pool_first: int = 0,
        *, act: Act = True, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(ch) != 1 or len(strides) != 1:
            raise ValueError(f"Classify: takes one input feature map, got {len(ch)} channel counts and {len(strides)} strides")
        if pool_first not in (0, 1):
            raise ValueError(f"Classify: pool_first must be 0 (conv then pool, YOLOv5) or 1 (pool then conv, timm), got {pool_first!r}")
        self.nc, self.nl, self.pool_first = nc, 1, bool(pool_first)
        self.register_buffer("stride", torch.tensor([float(strides[0])]), persistent=False)
        self.conv: nn.Module = Conv(ch[0], hidden, 1, 1, act=act) if hidden else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=dropout)
        self.linear = nn.Linear(hidden or ch[0], nc)

    @classmethod
    def output_axes(cls) -> tuple[dict[int, str], ...]:
        """One (batch, nc) output: only the batch is dynamic."""
        return ({0: "batch"},)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """A list-routed input (`from: [j]`) holds the one map; returns logits in training, probabilities in eval."""
        fmap = x[0] if isinstance(x, (list, tuple)) else x
        pooled = self.conv(self.pool(fmap)) if self.pool_first else self.pool(self.conv(fmap))
        logits = self.linear(self.drop(pooled.flatten(1)))
        return logits if self.training else logits.softmax(1)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Not meaningful: a classifier's output is (batch, nc) probabilities, with no boxes to split off."""
        raise NotImplementedError("Classify: the output is (batch, nc) class probabilities; there are no boxes to split")
