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


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip {"state_dict": ...} / {"model": ...} wrappers and DataParallel's "module." prefix."""
    while True:
        inner = next((state_dict[k] for k in ("state_dict", "model") if k in state_dict), None)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if not isinstance(inner, dict):
            break
        state_dict = inner
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
