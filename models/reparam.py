"""Re-parameterisation helpers: fold BatchNorm into convolutions and one walker for a whole model."""

from __future__ import annotations

import torch
from torch import nn


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kernel, bias) equal to conv(kernel, bias) followed by `bn` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    base = bias if bias is not None else torch.zeros_like(bn.running_mean)
    fused_kernel = kernel * scale.reshape(-1, 1, 1, 1)
    fused_bias = bn.bias + (base - bn.running_mean) * scale
    return fused_kernel, fused_bias


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new Conv2d with bias that computes bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    weight, bias = fold_bn(conv.weight, bn, conv.bias)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
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
