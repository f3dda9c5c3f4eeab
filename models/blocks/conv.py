"""The one Conv block (Conv2d without bias -> BatchNorm2d -> activation) shared by yaml rows, backbones and heads."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union, overload

import torch
from torch import nn

from models.registry import register_module
from models.reparam import fuse_conv_bn

# An activation: True (SiLU), False or None (none), a name ("relu", "gelu", "silu"), a module, or a zero-argument factory.
Act = Union[bool, None, str, nn.Module, Callable[[], nn.Module]]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


class BatchNormSettings(NamedTuple):
    """BatchNorm2d's eps and momentum: they change a trained model's numbers, so each family keeps its own."""

    eps: float
    momentum: float


YOLO_BN = BatchNormSettings(1e-3, 0.03)  # YOLOv5's
TORCH_BN = BatchNormSettings(1e-5, 0.1)  # PyTorch's defaults, which timm's MobileNetV4 and Apple's MobileOne train with


@overload
def autopad(k: int, p: int | None = None, d: int = 1) -> int: ...
@overload
def autopad(k: list[int], p: int | None = None, d: int = 1) -> int | list[int]: ...
def autopad(k: int | list[int], p: int | None = None, d: int = 1) -> int | list[int]:
    """Padding that keeps the spatial size ('same') for stride 1."""
    if p is not None:
        return p
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


def make_activation(act: Act) -> nn.Module:
    """Resolve an `Act` value to a fresh activation module; an unknown name raises ValueError listing the known ones."""
    if act is True:
        return nn.SiLU(inplace=True)
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[act]()
    if isinstance(act, nn.Module):
        return act
    return act()


@register_module("Conv", kind="conv", takes_act=True, stride_arg=3)
class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation; `reparameterize()` folds the BN into the conv."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: Act = True,
        bn: BatchNormSettings = YOLO_BN,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2, eps=bn.eps, momentum=bn.momentum)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def reparameterize(self) -> None:
        """Fold BN into the conv (eval-mode equivalent); idempotent."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


@register_module("DWConv", kind="conv", takes_act=True, stride_arg=3)
class DWConv(Conv):
    """Depthwise-style Conv with groups = gcd(c1, c2)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: Act = True) -> None:
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)
