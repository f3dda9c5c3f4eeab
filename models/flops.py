"""FLOP counting with torch.utils.flop_counter on the meta device (no real compute, any input size)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640, ch: int | None = None) -> float:
    """GFLOPs (2 x multiply-accumulates) of one forward pass at imgsz, counted on a meta-device copy."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if ch is None:
        ch = int(getattr(model, "yaml", {}).get("ch", 3))
    meta = copy.deepcopy(model).to("meta").eval()
    x = torch.empty(1, ch, h, w, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    return counter.get_total_flops() / 1e9
