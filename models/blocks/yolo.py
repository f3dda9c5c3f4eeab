"""YOLOv5 and YOLOv8 blocks built from Conv, with YOLOv5's constructor argument order and attribute names."""

from __future__ import annotations

import torch
from torch import nn

from models.blocks.conv import Act, Conv
from models.registry import add_module, register_module


@register_module("Bottleneck", kind="conv", takes_act=True)
class Bottleneck(nn.Module):
    """Two Convs (kernels `k`: 1x1 then 3x3 in YOLOv5, 3x3 twice in YOLOv8's C2f) with an optional residual."""

    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5, act: Act = True, k: tuple[int, int] = (1, 3)
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1, act=act)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register_module("C3", kind="csp", takes_act=True)
class C3(nn.Module):
    """CSP bottleneck with three convolutions and `n` Bottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, act: Act = True) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register_module("C2f", kind="csp", takes_act=True)
class C2f(nn.Module):
    """YOLOv8's CSP block: a 1x1 conv split in two halves, n 3x3-3x3 Bottlenecks chained on the second, every output concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5, act: Act = True) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1, act=act)
        self.cv2 = Conv((2 + n) * self.c, c2, 1, act=act)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, e=1.0, act=act, k=(3, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split((self.c, self.c), 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


@register_module("SPP", kind="conv", takes_act=True)
class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of kernels `k`."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] = (5, 9, 13), act: Act = True) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


@register_module("SPPF", kind="conv", takes_act=True)
class SPPF(nn.Module):
    """Fast SPP: three chained max-pools equal SPP(k, 2k-1, 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5, act: Act = True) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@register_module("Focus", kind="conv", takes_act=True, stride_arg=3, stride_mult=2)
class Focus(nn.Module):
    """Space-to-depth (2x2 pixel blocks into channels) followed by a Conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, act: Act = True) -> None:
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1)
        return self.conv(x)


@register_module("Concat", kind="concat")
class Concat(nn.Module):
    """Concatenate a list of tensors along `dimension`."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


add_module("nn.Upsample", nn.Upsample, kind="upsample")
add_module("nn.MaxPool2d", nn.MaxPool2d, kind="pool")
add_module("nn.ZeroPad2d", nn.ZeroPad2d, kind="pad")
add_module("nn.BatchNorm2d", nn.BatchNorm2d, kind="norm")
add_module("nn.Identity", nn.Identity, kind="shape")
