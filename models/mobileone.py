"""MobileOne (s0-s4) backbone with train-time branches that re-parameterise into one conv per unit."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Backbone, register_variants, unwrap_state_dict
from models.blocks.conv import TORCH_BN, Conv
from models.registry import register_module
from models.reparam import fold_bn

STAGE_BLOCKS = (2, 8, 10, 1)
BASE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (4, 8, 16, 32)
SE_RATIO = 0.0625


@dataclass(frozen=True)
class MobileOneVariant:
    """Width multipliers per stage, conv branches per unit and SE blocks (counted from each stage's end)."""

    widths: tuple[float, float, float, float]
    num_branches: int
    se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)

    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of the four stages."""
        return tuple(int(base * w) for base, w in zip(BASE_WIDTHS, self.widths))

    def stem_channels(self) -> int:
        """Output channels of the stem."""
        return min(64, int(64 * self.widths[0]))


VARIANTS: dict[str, MobileOneVariant] = {
    "s0": MobileOneVariant((0.75, 1.0, 1.0, 2.0), 4),
    "s1": MobileOneVariant((1.5, 1.5, 2.0, 2.5), 1),
    "s2": MobileOneVariant((1.5, 2.0, 2.5, 4.0), 1),
    "s3": MobileOneVariant((2.0, 2.5, 3.0, 4.0), 1),
    "s4": MobileOneVariant((3.0, 3.5, 3.5, 4.0), 1, se_blocks=(0, 0, 5, 1)),
}


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, ratio: float = SE_RATIO) -> None:
        super().__init__()
        hidden = int(channels * ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    """The bias of a conv built with bias=True (raises if it has none)."""
    if conv.bias is None:
        raise ValueError("expected a conv with bias")
    return conv.bias


class MobileOneUnit(nn.Module):
    """One MobileOne unit: k conv branches + 1x1 scale + identity BN (training form) or one fused conv, then SE and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
        use_se: bool = False,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.groups, self.num_branches, self.use_se = stride, groups, num_branches, use_se
        self.fused: nn.Conv2d | None = None
        self.convs = nn.ModuleList()
        self.scale: Conv | None = None
        self.skip: nn.BatchNorm2d | None = None
        if inference_mode:
            self.fused = self._fused_conv()
        else:
            branch = (in_channels, out_channels, kernel_size, stride)
            self.convs.extend(Conv(*branch, g=groups, act=False, bn=TORCH_BN) for _ in range(num_branches))
            if kernel_size > 1:
                self.scale = Conv(in_channels, out_channels, 1, stride, g=groups, act=False, bn=TORCH_BN)
            if in_channels == out_channels and stride == 1:
                self.skip = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels) if use_se else None
        self.act = nn.ReLU(inplace=True)

    @property
    def is_fused(self) -> bool:
        """True once the unit holds a single fused conv."""
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            out = self.fused(x)
        else:
            out = self.convs[0](x)
            for branch in self.convs[1:]:
                out = out + branch(x)
            if self.scale is not None:
                out = out + self.scale(x)
            if self.skip is not None:
                out = out + self.skip(x)
        if self.se is not None:
            out = self.se(out)
        return self.act(out)

    def training_twin(self) -> MobileOneUnit:
        """A fresh training-form unit with this unit's configuration."""
        return MobileOneUnit(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups, self.num_branches, self.use_se
        )

    def _fused_conv(self) -> nn.Conv2d:
        """An empty conv with bias shaped like the fused form."""
        k = self.kernel_size
        return nn.Conv2d(self.in_channels, self.out_channels, k, self.stride, k // 2, groups=self.groups, bias=True)

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """Kernel (C, C/groups, k, k) that reproduces the input under this unit's grouping."""
        c, k = self.out_channels, self.kernel_size
        per_group = self.in_channels // self.groups
        kernel = torch.zeros(c, per_group, k, k, dtype=like.dtype, device=like.device)
        idx = torch.arange(c, device=like.device)
        kernel[idx, idx % per_group, k // 2, k // 2] = 1.0
        return kernel

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of all BN-folded branches as one (kernel, bias) pair."""
        if self.fused is not None:
            return self.fused.weight, _conv_bias(self.fused)
        # The branches are Conv with a BatchNorm2d until reparameterized (then `fused` is set and they are gone).
        branches = [cast(Conv, m) for m in self.convs]
        kernel, bias = fold_bn(branches[0].conv.weight, cast(nn.BatchNorm2d, branches[0].bn))
        for branch in branches[1:]:
            w, b = fold_bn(branch.conv.weight, cast(nn.BatchNorm2d, branch.bn))
            kernel, bias = kernel + w, bias + b
        if self.scale is not None:
            w, b = fold_bn(self.scale.conv.weight, cast(nn.BatchNorm2d, self.scale.bn))
            pad = self.kernel_size // 2
            kernel, bias = kernel + F.pad(w, [pad, pad, pad, pad]), bias + b
        if self.skip is not None:
            w, b = fold_bn(self._identity_kernel(kernel), self.skip)
            kernel, bias = kernel + w, bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Collapse all branches into one conv with bias and drop the branches (no-op when already fused)."""
        if self.fused is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        conv = self._fused_conv().to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        _conv_bias(conv).copy_(bias)
        self.fused = conv
        self.convs = nn.ModuleList()
        self.scale = None
        self.skip = None


# Apple's MobileOneBlock is one unit; as a yaml row: [c2, k, s, groups, num_branches, use_se] (parse inserts c1).
register_module("MobileOneBlock", kind="conv", stride_arg=3)(MobileOneUnit)


def _build_stage(
    c1: int, c2: int, num_blocks: int, num_se: int, num_branches: int, inference_mode: bool
) -> nn.Sequential:
    """A stage of blocks, each a depthwise 3x3 unit then a pointwise 1x1 unit; stride 2 on the first block."""
    units: list[nn.Module] = []
    for i in range(num_blocks):
        se = i >= num_blocks - num_se
        stride = 2 if i == 0 else 1
        units.append(MobileOneUnit(c1, c1, 3, stride, c1, num_branches, se, inference_mode))
        units.append(MobileOneUnit(c1, c2, 1, 1, 1, num_branches, se, inference_mode))
        c1 = c2
    return nn.Sequential(*units)


# Checkpoint key translation: (unit location, part inside the unit) from Apple, timm or our own names.
_LOCATION = re.compile(r"^(?:(?:stem|stage0)\.|stage([1-4])\.(\d+)\.|stages\.(\d+)\.(\d+)\.)(.+)$")
_PART_PREFIXES = (
    ("rbr_conv.", "convs."),
    ("conv_kxk.", "convs."),
    ("convs.", "convs."),
    ("rbr_scale.", "scale."),
    ("conv_scale.", "scale."),
    ("scale.", "scale."),
    ("rbr_skip.", "skip."),
    ("identity.", "skip."),
    ("skip.", "skip."),
    ("attn.fc1.", "se.reduce."),
    ("attn.fc2.", "se.expand."),
    ("se.reduce.", "se.reduce."),
    ("se.expand.", "se.expand."),
    ("reparam_conv.", "fused."),
    ("fused.", "fused."),
)


def _translate(key: str) -> tuple[str, str] | None:
    """Map a checkpoint key to (our unit path, our name inside the unit), or None if it is not a backbone key."""
    match = _LOCATION.match(key)
    if match is None:
        return None
    apple_stage, apple_idx, our_stage, our_idx, rest = match.groups()
    if apple_stage is not None:
        path = f"stages.{int(apple_stage) - 1}.{apple_idx}"
    elif our_stage is not None:
        path = f"stages.{our_stage}.{our_idx}"
    else:
        path = "stem"
    for prefix, ours in _PART_PREFIXES:
        if rest.startswith(prefix):
            return path, ours + rest[len(prefix) :]
    return None


def _fuse_source(unit: MobileOneUnit, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Fold training-form tensors for a fused `unit` into fused tensors; None when they do not fit."""
    twin = unit.training_twin()
    try:
        result = twin.load_state_dict(parts, strict=False)
    except RuntimeError:
        return None
    if result.unexpected_keys or any(not k.endswith("num_batches_tracked") for k in result.missing_keys):
        return None
    twin.reparameterize()
    return dict(twin.state_dict())


class MobileOne(Backbone):
    """MobileOne s0-s4 feature extractor returning the selected stage maps at strides 4, 8, 16, 32."""

    def __init__(
        self,
        variant: str = "s0",
        in_channels: int = 3,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MobileOne variant {variant!r}; known: {', '.join(VARIANTS)}")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not 0 <= out_indices[0] <= out_indices[-1] < 4:
            raise ValueError(f"out_indices must be increasing stage indices in 0..3, got {out_indices}")
        cfg = VARIANTS[variant]
        self.variant = variant
        self.out_indices = out_indices
        channels = cfg.stage_channels()
        self.out_channels = tuple(channels[i] for i in out_indices)
        self.strides = tuple(STAGE_STRIDES[i] for i in out_indices)
        c1 = cfg.stem_channels()
        self.stem = MobileOneUnit(in_channels, c1, 3, 2, 1, 1, False, inference_mode)
        self.stages = nn.ModuleList()
        for i in range(out_indices[-1] + 1):  # stages past the last requested one are not built
            self.stages.append(_build_stage(c1, channels[i], STAGE_BLOCKS[i], cfg.se_blocks[i], cfg.num_branches, inference_mode))
            c1 = channels[i]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outputs.append(x)
        return outputs

    def units(self) -> dict[str, MobileOneUnit]:
        """All MobileOne units by their module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MobileOneUnit)}

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Map Apple (training or fused), timm or our own MobileOne weights onto this model's keys.

        Returns (mapped, unused_keys). Units whose checkpoint is fused are converted to fused form first;
        training-form weights for units built fused are folded on the fly.
        """
        units = self.units()
        grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        unused: list[str] = []
        for key, value in unwrap_state_dict(state_dict).items():
            where = _translate(key)
            if where is None or where[0] not in units or not isinstance(value, torch.Tensor):
                unused.append(key)
                continue
            grouped.setdefault(where[0], {})[where[1]] = (key, value)
        fused_now = [p for p, parts in grouped.items() if not units[p].is_fused and any(n.startswith("fused.") for n in parts)]
        for path in fused_now:
            units[path].reparameterize()
        if fused_now:
            msg = f"MobileOne: checkpoint is fused; converted {len(fused_now)} units to fused (inference) form"
            warnings.warn(msg, stacklevel=2)
        own = {k: v.shape for k, v in self.state_dict().items()}
        mapped: dict[str, torch.Tensor] = {}
        for path, parts in grouped.items():
            if units[path].is_fused and not any(n.startswith("fused.") for n in parts):
                folded = _fuse_source(units[path], {n: v for n, (_, v) in parts.items()})
                if folded is None:
                    unused.extend(k for k, _ in parts.values())
                    continue
                parts = {n: ("", v) for n, v in folded.items()}
            for name, (key, value) in parts.items():
                if own.get(f"{path}.{name}") == value.shape:
                    mapped[f"{path}.{name}"] = value
                elif key:
                    unused.append(key)
        return mapped, unused


register_variants(MobileOne, "MobileOne", VARIANTS)  # MobileOneS0 ... MobileOneS4
