"""MobileNetV4 detection backbones (conv_small/medium/large, hybrid_medium/large) returning the /4../32 stage maps."""

from __future__ import annotations

from typing import NamedTuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Backbone, register_variants, unwrap_state_dict
from models.blocks.conv import TORCH_BN, Conv

LAYER_SCALE_INIT = 1e-5
STAGE_STRIDES = (4, 8, 16, 32)


# ---------------------------------------------------------------------------------------------------------------
# Architecture tables
# ---------------------------------------------------------------------------------------------------------------


class ConvSpec(NamedTuple):
    """`cn`: k x k conv + BN + act."""

    kernel: int
    stride: int
    out: int


class FusedSpec(NamedTuple):
    """`er`: FusedIB with a full k x k expansion conv."""

    kernel: int
    stride: int
    expand: float
    out: int


class UIBSpec(NamedTuple):
    """`uib`: universal inverted bottleneck; a kernel of 0 means that depthwise conv is absent."""

    start_kernel: int
    mid_kernel: int
    stride: int
    expand: float
    out: int


class MQASpec(NamedTuple):
    """Mobile multi-query attention block (keeps the channel count)."""

    heads: int
    key_dim: int
    kv_stride: int


BlockSpec = Union[ConvSpec, FusedSpec, UIBSpec, MQASpec]


class VariantSpec(NamedTuple):
    """One MobileNetV4 variant: stem width, activation, layer scale and the four stage tables."""

    stem: int
    act: str
    layer_scale: bool
    stages: tuple[tuple[BlockSpec, ...], ...]


def _uibs(out: int, expand: float, *kernels: tuple[int, int], first_stride: int = 2) -> tuple[UIBSpec, ...]:
    """UIB specs of equal width/expansion from (start, mid) kernel pairs; the first one carries `first_stride`."""
    return tuple(UIBSpec(a, k, first_stride if i == 0 else 1, expand, out) for i, (a, k) in enumerate(kernels))


def _repeat(blocks: tuple[BlockSpec, ...], n: int) -> tuple[BlockSpec, ...]:
    """A run of blocks repeated n times (typed, unlike a list of mixed specs)."""
    return blocks * n


def _u(a: int, k: int, e: float, c: int, s: int = 1) -> UIBSpec:
    """Shorthand for one UIB spec."""
    return UIBSpec(a, k, s, e, c)


_MQA_HM16, _MQA_HM32 = MQASpec(4, 64, 2), MQASpec(4, 64, 1)
_MQA_HL16, _MQA_HL32 = MQASpec(8, 48, 2), MQASpec(8, 64, 1)

VARIANTS: dict[str, VariantSpec] = {
    "conv_small": VariantSpec(32, "relu", False, (
        (ConvSpec(3, 2, 32), ConvSpec(1, 1, 32)),
        (ConvSpec(3, 2, 96), ConvSpec(1, 1, 64)),
        (_u(5, 5, 3, 96, 2), *[_u(0, 3, 2, 96)] * 4, _u(3, 0, 4, 96)),
        (_u(3, 3, 6, 128, 2), _u(5, 5, 4, 128), _u(0, 5, 4, 128), _u(0, 5, 3, 128), _u(0, 3, 4, 128), _u(0, 3, 4, 128)),
    )),
    "conv_medium": VariantSpec(32, "relu", False, (
        (FusedSpec(3, 2, 4, 48),),
        (_u(3, 5, 4, 80, 2), _u(3, 3, 2, 80)),
        (_u(3, 5, 6, 160, 2), _u(3, 3, 4, 160), _u(3, 3, 4, 160), _u(3, 5, 4, 160), _u(3, 3, 4, 160),
         _u(3, 0, 4, 160), _u(0, 0, 2, 160), _u(3, 0, 4, 160)),
        (_u(5, 5, 6, 256, 2), _u(5, 5, 4, 256), _u(3, 5, 4, 256), _u(3, 5, 4, 256), _u(0, 0, 4, 256), _u(3, 0, 4, 256),
         _u(3, 5, 2, 256), _u(5, 5, 4, 256), _u(0, 0, 4, 256), _u(0, 0, 4, 256), _u(5, 0, 2, 256)),
    )),
    "conv_large": VariantSpec(24, "relu", False, (
        (FusedSpec(3, 2, 4, 48),),
        (_u(3, 5, 4, 96, 2), _u(3, 3, 4, 96)),
        _uibs(192, 4, (3, 5), (3, 3), (3, 3), (3, 3), (3, 5), *[(5, 3)] * 5, (3, 0)),
        _uibs(512, 4, (5, 5), (5, 5), (5, 5), (5, 5), (5, 0), (5, 3), (5, 0), (5, 0), (5, 3), (5, 5), (5, 0), (5, 0), (5, 0)),
    )),
    "hybrid_medium": VariantSpec(32, "relu", True, (
        (FusedSpec(3, 2, 4, 48),),
        (_u(3, 5, 4, 80, 2), _u(3, 3, 2, 80)),
        (_u(3, 5, 6, 160, 2), _u(0, 0, 2, 160), _u(3, 3, 4, 160), _u(3, 5, 4, 160), _MQA_HM16, _u(3, 3, 4, 160),
         _MQA_HM16, _u(3, 0, 4, 160), _MQA_HM16, _u(3, 3, 4, 160), _MQA_HM16, _u(3, 0, 4, 160)),
        (_u(5, 5, 6, 256, 2), _u(5, 5, 4, 256), _u(3, 5, 4, 256), _u(3, 5, 4, 256), _u(0, 0, 2, 256), _u(3, 5, 2, 256),
         _u(0, 0, 2, 256), _u(0, 0, 4, 256), _MQA_HM32, _u(3, 0, 4, 256), _MQA_HM32, _u(5, 5, 4, 256), _MQA_HM32,
         _u(5, 0, 4, 256), _MQA_HM32, _u(5, 0, 4, 256)),
    )),
    "hybrid_large": VariantSpec(24, "gelu", True, (
        (FusedSpec(3, 2, 4, 48),),
        (_u(3, 5, 4, 96, 2), _u(3, 3, 4, 96)),
        (*_uibs(192, 4, (3, 5), (3, 3), (3, 3), (3, 3), (3, 5), (5, 3), (5, 3)),
         *_repeat((_MQA_HL16, _u(5, 3, 4, 192)), 3), _MQA_HL16, _u(3, 0, 4, 192)),
        (*_uibs(512, 4, (5, 5), (5, 5), (5, 5), (5, 5), (5, 0), (5, 3), (5, 0), (5, 0), (5, 3), (5, 5)),
         *_repeat((_MQA_HL32, _u(5, 0, 4, 512)), 4)),
    )),
}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to the nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class LayerScale(nn.Module):
    """Learnable per-channel scale gamma (C,), applied to NCHW maps."""

    def __init__(self, channels: int, init: float = LAYER_SCALE_INIT) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply each channel by its gamma."""
        return x * self.gamma.view(1, -1, 1, 1)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `rate` during training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Randomly drop whole samples and rescale the kept ones (identity in eval mode)."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


def _drop_path(rate: float) -> nn.Module:
    """DropPath for a positive rate, otherwise Identity."""
    return DropPath(rate) if rate > 0 else nn.Identity()


class FusedIB(nn.Module):
    """Fused inverted bottleneck: full k x k conv in -> hidden (BN, act), then 1x1 hidden -> out (BN)."""

    timm_names = (("conv_exp", "expand.conv"), ("bn1", "expand.bn"), ("conv_pwl", "project.conv"), ("bn2", "project.bn"))

    def __init__(self, c1: int, spec: FusedSpec, act: str, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = make_divisible(c1 * spec.expand)
        self.expand = Conv(c1, hidden, spec.kernel, spec.stride, act=act, bn=TORCH_BN)
        self.project = Conv(hidden, spec.out, 1, act=False, bn=TORCH_BN)
        self.residual = spec.stride == 1 and c1 == spec.out
        self.drop_path = _drop_path(drop_path) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, project, and add the input when shapes allow."""
        y = self.project(self.expand(x))
        return x + self.drop_path(y) if self.residual else y


class UIB(nn.Module):
    """Universal inverted bottleneck: [start dw] -> 1x1 expand -> [middle dw] -> 1x1 project -> [layer scale] (+ x)."""

    timm_names = (("dw_start", "dw_start"), ("pw_exp", "pw_exp"), ("dw_mid", "dw_mid"), ("pw_proj", "pw_proj"),
                  ("layer_scale", "layer_scale"))

    def __init__(self, c1: int, spec: UIBSpec, act: str, layer_scale: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = make_divisible(c1 * spec.expand)
        start_stride = 1 if spec.mid_kernel else spec.stride
        self.dw_start = Conv(c1, c1, spec.start_kernel, start_stride, g=c1, act=False, bn=TORCH_BN) if spec.start_kernel else nn.Identity()
        self.pw_exp = Conv(c1, hidden, 1, act=act, bn=TORCH_BN)
        mid_kernel = spec.mid_kernel
        self.dw_mid = Conv(hidden, hidden, mid_kernel, spec.stride, g=hidden, act=act, bn=TORCH_BN) if mid_kernel else nn.Identity()
        self.pw_proj = Conv(hidden, spec.out, 1, act=False, bn=TORCH_BN)
        self.layer_scale = LayerScale(spec.out) if layer_scale else nn.Identity()
        self.residual = spec.stride == 1 and c1 == spec.out
        self.drop_path = _drop_path(drop_path) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the bottleneck and add the input when stride is 1 and widths match."""
        y = self.layer_scale(self.pw_proj(self.dw_mid(self.pw_exp(self.dw_start(x)))))
        return x + self.drop_path(y) if self.residual else y


class KVProjection(nn.Module):
    """Shared key or value head: optional depthwise 3x3 stride-`kv_stride` conv + BN, then 1x1 conv C -> dim."""

    def __init__(self, channels: int, dim: int, kv_stride: int) -> None:
        super().__init__()
        self.down = Conv(channels, channels, 3, kv_stride, g=channels, act=False, bn=TORCH_BN) if kv_stride > 1 else nn.Identity()
        self.proj = nn.Conv2d(channels, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (B, dim, ceil(H/s), ceil(W/s)) key or value map."""
        return self.proj(self.down(x))


class MultiQueryAttention(nn.Module):
    """Multi-query attention on NCHW maps: `heads` query heads sharing one key head and one value head."""

    def __init__(self, channels: int, heads: int, key_dim: int, kv_stride: int = 1) -> None:
        super().__init__()
        self.heads, self.key_dim, self.kv_stride = heads, key_dim, kv_stride
        self.query = nn.Conv2d(channels, heads * key_dim, 1, bias=False)
        self.key = KVProjection(channels, key_dim, kv_stride)
        self.value = KVProjection(channels, key_dim, kv_stride)
        self.output = nn.Conv2d(heads * key_dim, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend from every position to the (downsampled) key/value positions and project back to C channels."""
        b, _, h, w = x.shape
        q = self.query(x).reshape(b, self.heads, self.key_dim, h * w).transpose(-1, -2)  # (B, heads, HW, d)
        k = self.key(x).flatten(2).transpose(-1, -2).unsqueeze(1)  # (B, 1, P, d)
        v = self.value(x).flatten(2).transpose(-1, -2).unsqueeze(1)
        shape = (b, self.heads, k.shape[2], self.key_dim)
        o = F.scaled_dot_product_attention(q, k.expand(shape), v.expand(shape))  # scale = key_dim ** -0.5
        return self.output(o.transpose(-1, -2).reshape(b, self.heads * self.key_dim, h, w))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, key_dim={self.key_dim}, kv_stride={self.kv_stride}"


class MobileMQA(nn.Module):
    """Mobile MQA block: x + layer_scale(MQA(BN(x)))."""

    timm_names = (("norm", "norm"), ("attn.query.proj", "attn.query"), ("attn.key.down_conv", "attn.key.down.conv"),
                  ("attn.key.norm", "attn.key.down.bn"), ("attn.key.proj", "attn.key.proj"),
                  ("attn.value.down_conv", "attn.value.down.conv"), ("attn.value.norm", "attn.value.down.bn"),
                  ("attn.value.proj", "attn.value.proj"), ("attn.output.proj", "attn.output"), ("layer_scale", "layer_scale"))

    def __init__(self, channels: int, spec: MQASpec, layer_scale: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.attn = MultiQueryAttention(channels, spec.heads, spec.key_dim, spec.kv_stride)
        self.layer_scale = LayerScale(channels) if layer_scale else nn.Identity()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm attention with a residual connection."""
        return x + self.drop_path(self.layer_scale(self.attn(self.norm(x))))


def build_block(c1: int, spec: BlockSpec, variant: VariantSpec, drop_path: float) -> tuple[nn.Module, int]:
    """Build one block from its spec; returns (module, output channels)."""
    if isinstance(spec, ConvSpec):
        return Conv(c1, spec.out, spec.kernel, spec.stride, act=variant.act, bn=TORCH_BN), spec.out
    if isinstance(spec, FusedSpec):
        return FusedIB(c1, spec, variant.act, drop_path), spec.out
    if isinstance(spec, UIBSpec):
        return UIB(c1, spec, variant.act, variant.layer_scale, drop_path), spec.out
    return MobileMQA(c1, spec, variant.layer_scale, drop_path), c1


# ---------------------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------------------


CONV_TIMM_NAMES = (("conv", "conv"), ("bn1", "bn"))  # timm's ConvNormAct keys -> our Conv's


def _timm_names(block: nn.Module) -> tuple[tuple[str, str], ...]:
    """A stage block's timm -> ours key prefixes: its own table, or a plain Conv's."""
    return getattr(block, "timm_names", CONV_TIMM_NAMES if isinstance(block, Conv) else ())


def _rename(rest: str, names: tuple[tuple[str, str], ...]) -> str | None:
    """Rename the leading part of `rest` using the longest matching (source, target) prefix pair."""
    for src, dst in sorted(names, key=lambda pair: -len(pair[0])):
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


class MobileNetV4(Backbone):
    """MobileNetV4 stem + four stages; forward returns the stage-end maps (strides 4, 8, 16, 32) picked by out_indices.

    Stages after the last selected index are not built. The 960/1280 classification convs are never built.
    """

    timm_stem_names = (("conv_stem", "stem.conv"), ("bn1", "stem.bn"))

    def __init__(
        self,
        variant: str = "conv_small",
        in_channels: int = 3,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MobileNetV4 variant {variant!r}; known variants: {', '.join(VARIANTS)}")
        out_indices = tuple(out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be increasing unique stage indices in 0..3, got {out_indices!r}")
        spec = VARIANTS[variant]
        self.variant, self.out_indices = variant, out_indices
        self.stem = Conv(in_channels, spec.stem, 3, 2, act=spec.act, bn=TORCH_BN)
        stage_specs = spec.stages[: out_indices[-1] + 1]
        depth = sum(len(s) for s in stage_specs)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear from 0 to drop_path_rate
        self.stages = nn.ModuleList()
        widths, c, n = [], spec.stem, 0
        for blocks in stage_specs:
            stage = nn.Sequential()
            for block_spec in blocks:
                block, c = build_block(c, block_spec, spec, rates[n])
                stage.append(block)
                n += 1
            self.stages.append(stage)
            widths.append(c)
        self.out_channels = tuple(widths[i] for i in out_indices)
        self.strides = tuple(STAGE_STRIDES[i] for i in out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the selected stage outputs, shallowest first."""
        x = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outputs.append(x)
        return outputs

    def _map_key(self, key: str) -> str | None:
        """Our key for a timm MobileNetV4 key, or None if it has no counterpart here."""
        parts = key.split(".", 3)
        if parts[0] != "blocks":
            return _rename(key, self.timm_stem_names)
        if len(parts) < 4 or not (parts[1].isdigit() and parts[2].isdigit()):
            return None
        s, b = int(parts[1]), int(parts[2])
        if s >= len(self.stages) or b >= len(stage := cast(nn.Sequential, self.stages[s])):
            return None
        rest = _rename(parts[3], _timm_names(stage[b]))
        return None if rest is None else f"stages.{s}.{b}.{rest}"

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Map a timm MobileNetV4 (or our own) state_dict onto this module's keys; returns (mapped, unused keys)."""
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        unused: list[str] = []
        for key, value in unwrap_state_dict(state_dict).items():
            target = key if key in own else self._map_key(key)
            if target is None or target not in own or own[target].shape != value.shape:
                unused.append(key)
            else:
                mapped[target] = value
        return mapped, unused


register_variants(MobileNetV4, "MobileNetV4", VARIANTS)  # MobileNetV4ConvSmall ... MobileNetV4HybridLarge
