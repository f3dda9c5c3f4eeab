"""Conv + BatchNorm (+ activation) unit shared by the MobileNetV4 and MobileOne backbones."""

from __future__ import annotations

import torch
from torch import nn

from models.reparam import fuse_conv_bn


def make_act(name: str) -> nn.Module:
    """Activation module by name ('relu' or 'gelu')."""
    return nn.ReLU(inplace=True) if name == "relu" else nn.GELU()


class ConvBN(nn.Module):
    """k x k conv (no bias) -> BN -> optional activation; `reparameterize()` folds the BN into the conv."""

    timm_names = (("conv", "conv"), ("bn1", "bn"))  # timm MobileNetV4 key -> ours, used by convert_state_dict

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, groups: int = 1, act: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        self.act = make_act(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and activation."""
        return self.act(self.bn(self.conv(x)))

    def reparameterize(self) -> None:
        """Fold BN (running statistics) into the conv; calling it again does nothing."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()
