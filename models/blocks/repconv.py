"""RT-DETR's re-parameterisable blocks: RepConv (kxk + 1x1 + optional identity BN -> one kxk conv) and RepC3."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks.conv import Act, Conv, make_activation
from models.registry import register_module
from models.reparam import fold_bn


def _conv_kernel_bias(unit: Conv) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) equal to `unit` without its activation in eval mode, whether or not its BN is already folded."""
    conv = unit.conv
    if isinstance(unit.bn, nn.BatchNorm2d):
        return fold_bn(conv.weight, unit.bn, conv.bias)
    if not isinstance(unit.bn, nn.Identity):
        raise TypeError(f"cannot fold a Conv whose norm is {type(unit.bn).__name__}")
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    return conv.weight, bias


@register_module("RepConv", kind="conv", takes_act=True, stride_arg=3)
class RepConv(nn.Module):
    """act(kxk conv+BN + 1x1 conv+BN [+ BN identity]) in training form; `reparameterize()` makes it act(one kxk conv)."""

    def __init__(
        self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1, d: int = 1, act: Act = True, bn: bool = False
    ) -> None:
        super().__init__()
        if k % 2 != 1 or p < k // 2:
            raise ValueError(f"RepConv needs an odd kernel and padding >= k // 2 (the 1x1 branch's padding), got k={k}, p={p}")
        if d != 1:
            raise ValueError(f"RepConv does not support dilation, got d={d}")
        self.c1, self.c2, self.k, self.s, self.p, self.g = c1, c2, k, s, p, g
        self.act = make_activation(act)
        self.conv1: Conv | None = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2: Conv | None = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(c1) if bn and c1 == c2 and s == 1 else None
        self.conv: nn.Conv2d | None = None  # the fused kxk conv, set by reparameterize()

    @property
    def is_fused(self) -> bool:
        """True once the branches have been replaced by one conv."""
        return self.conv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        conv1, conv2 = cast(Conv, self.conv1), cast(Conv, self.conv2)
        out = conv1(x) + conv2(x)
        if self.bn is not None:
            out = out + self.bn(x)
        return self.act(out)

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """kxk kernel (c2, c1/g, k, k) that passes every channel through unchanged under this block's grouping."""
        per_group, k = self.c1 // self.g, self.k
        kernel = torch.zeros(self.c2, per_group, k, k, dtype=like.dtype, device=like.device)
        idx = torch.arange(self.c2, device=like.device)
        kernel[idx, idx % per_group, k // 2, k // 2] = 1.0
        return kernel

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The branches summed into one (kxk kernel, bias) pair, valid in eval mode."""
        if self.conv is not None:
            if self.conv.bias is None:  # cannot happen: reparameterize() builds it with bias=True
                raise RuntimeError("fused RepConv conv has no bias")
            return self.conv.weight, self.conv.bias
        kernel, bias = _conv_kernel_bias(cast(Conv, self.conv1))
        w1, b1 = _conv_kernel_bias(cast(Conv, self.conv2))
        pad = self.k // 2  # the 1x1 tap sits at the kxk centre (its padding is p - k // 2)
        kernel, bias = kernel + F.pad(w1, [pad, pad, pad, pad]), bias + b1
        if self.bn is not None:
            wi, bi = fold_bn(self._identity_kernel(kernel), self.bn)
            kernel, bias = kernel + wi, bias + bi
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one kxk conv with bias (same function in eval mode); no-op when already fused."""
        if self.conv is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        conv = nn.Conv2d(self.c1, self.c2, self.k, self.s, self.p, groups=self.g, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        cast(torch.Tensor, conv.bias).copy_(bias)
        conv.requires_grad_(False)  # inference form, as fuse_conv_bn leaves Conv
        self.conv = conv
        self.conv1 = None
        self.conv2 = None
        self.bn = None


@register_module("RepC3", kind="csp")
class RepC3(nn.Module):
    """RT-DETR's CSP block: cv3(m(cv1(x)) + cv2(x)) with `n` RepConvs in m (cv3 is the identity when c_ == c2)."""

    def __init__(self, c1: int, c2: int, n: int = 3, e: float = 1.0) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.m = nn.Sequential(*(RepConv(c_, c_) for _ in range(n)))
        self.cv3: nn.Module = Conv(c_, c2, 1, 1) if c_ != c2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.m(self.cv1(x)) + self.cv2(x))
