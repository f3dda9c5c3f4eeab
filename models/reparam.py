"""Re-parameterisation helpers: fold BatchNorm into convolutions and one walker for a whole model."""

from __future__ import annotations

from typing import Union, cast

import torch
from torch import nn

# Conv2d stores its 2-d geometry as tuple[int, ...] while its constructor is annotated with tuple[int, int].
_Pair = tuple[int, int]


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kernel, bias) equal to conv(kernel, bias) followed by `bn` in eval mode."""
    running_mean, running_var = bn.running_mean, bn.running_var
    if running_mean is None or running_var is None:
        raise ValueError("fold_bn needs a BatchNorm2d with running statistics (track_running_stats=True)")
    std = (running_var + bn.eps).sqrt()
    scale = bn.weight / std
    base = bias if bias is not None else torch.zeros_like(running_mean)
    fused_kernel = kernel * scale.reshape(-1, 1, 1, 1)
    fused_bias = bn.bias + (base - running_mean) * scale
    return fused_kernel, fused_bias


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new Conv2d with bias that computes bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        cast(_Pair, conv.kernel_size),
        cast(_Pair, conv.stride),
        cast(Union[str, _Pair], conv.padding),
        cast(_Pair, conv.dilation),
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    weight, bias = fold_bn(conv.weight, bn, conv.bias)
    fused_bias = fused.bias
    if fused_bias is None:  # cannot happen: built with bias=True
        raise RuntimeError("fused conv has no bias")
    fused.weight.copy_(weight)
    fused_bias.copy_(bias)
    fused.requires_grad_(False)
    return fused


@torch.no_grad()
def reparameterize_model(model: nn.Module) -> nn.Module:
    """Convert `model` in place to its inference form by calling `reparameterize()` on every block that has one.

    A block's `reparameterize()` converts its whole subtree, so the walker does not descend into it.
    """
    method = getattr(model, "reparameterize", None)
    if callable(method):
        method()
        return model
    for child in model.children():
        reparameterize_model(child)
    return model
