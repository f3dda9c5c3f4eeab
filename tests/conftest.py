"""Shared fixtures: a tiny list-returning backbone registered only for the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbone import Backbone
from models.registry import add_module, remove_module

TUTORIAL_YAML = """
nc: 80
depth_multiple: 0.33
width_multiple: 0.50
anchors:
  - [10,13, 16,30, 33,23]
  - [30,61, 62,45, 59,119]
  - [116,90, 156,198, 373,326]
backbone:
  [[-1, 1, {backbone}, []],   # fills indices 0-4
   [-1, 1, SPPF, [1024, 5]]]            # 5
head:
  [[-1, 1, Conv, [512, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 3], 1, Concat, [1]],            # stride-16 backbone map
   [-1, 3, C3, [512, False]],            # 9
   [-1, 1, Conv, [256, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 2], 1, Concat, [1]],            # stride-8 backbone map
   [-1, 3, C3, [256, False]],            # 13 (P3/8)
   [-1, 1, Conv, [256, 3, 2]],
   [[-1, 10], 1, Concat, [1]],
   [-1, 3, C3, [512, False]],            # 16 (P4/16)
   [-1, 1, Conv, [512, 3, 2]],
   [[-1, 5], 1, Concat, [1]],
   [-1, 3, C3, [1024, False]],           # 19 (P5/32)
   [[13, 16, 19], 1, Detect, [nc, anchors]]]
"""


class TinyBackbone(Backbone):
    """Four strided convs giving stride 4, 8, 16, 32 maps with distinct channel counts."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.out_channels = (8, 16, 24, 32)
        self.strides = (4, 8, 16, 32)
        chans = (in_channels, *self.out_channels)
        self.stem = nn.Conv2d(in_channels, in_channels, 3, 2, 1)
        self.stages = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1) for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


@pytest.fixture
def tiny_backbone():
    """Register TinyBackbone as 'TinyBackbone' for the duration of a test."""
    add_module("TinyBackbone", TinyBackbone, kind="backbone")
    yield TinyBackbone
    remove_module("TinyBackbone")


def assert_declared_shapes(model: nn.Module, sizes: list[tuple[int, int]]) -> None:
    """Each feature map's channels and stride equal the backbone's statically declared out_channels/strides."""
    with torch.no_grad():
        for h, w in sizes:
            feats = model(torch.randn(1, 3, h, w))
            got = [(f.shape[1], h // f.shape[2], w // f.shape[3]) for f in feats]
            assert got == [(c, s, s) for c, s in zip(model.out_channels, model.strides)], (h, w)
