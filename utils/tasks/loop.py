"""Helpers every task's validation loop uses: timing a stage on the device, and eval mode with exact restore."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(evaluator: Any, stage: str, device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), its wall time (device-synchronised) added to the evaluator's `stage`."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    evaluator.add_time(stage, time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def eval_mode(model: Any, half: bool) -> Iterator[None]:
    """Every submodule in eval mode and the weights in the wanted float type for the pass; both restored exactly afterwards.

    The original weight tensors are kept and put back (not cast back), so a float32 EMA validated in fp16 loses no bits.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    wanted = torch.float16 if half else torch.float32
    cast = any(p.is_floating_point() and p.dtype != wanted for p in model.parameters())
    params = [(p, p.data) for p in model.parameters()] if cast else []
    buffers = [(m, k, b) for m in model.modules() for k, b in m._buffers.items() if b is not None] if cast else []
    try:
        if cast:
            model.to(wanted)
        model.eval()
        yield
    finally:
        for p, data in params:
            p.data = data
        for m, k, b in buffers:
            m._buffers[k] = b
        for m, training in modes:
            m.training = training
