"""Base class for list-returning backbones that parse_model splices into the YOLOv5 layer list."""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """A feature extractor returning one map per entry of `strides`, with `out_channels` declared statically.

    Subclasses set `out_channels` and `strides` (tuples, same length, strides increasing) in
    `__init__` from their architecture tables, never by running a dummy forward pass.
    """

    out_channels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class FeatureSelect(nn.Module):
    """Picks feature map `index` from a backbone's output list (fills layer indices after the backbone)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"
