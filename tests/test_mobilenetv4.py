"""Tests for the MobileNetV4 backbones: exact sizes, shapes at any input size, MQA maths, timm parity, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.mobilenetv4 import UIB, LayerScale, MobileMQA, MobileNetV4, MultiQueryAttention
from models.registry import get_module
from tests.conftest import assert_declared_shapes, calibrate_bn, random_images, rel_err, rounding_tol

VARIANTS = ("conv_small", "conv_medium", "conv_large", "hybrid_medium", "hybrid_large")
PARAMS = {  # stem + four stages, no 960 conv, from the reference table
    "conv_small": 1_136_864,
    "conv_medium": 6_955_472,
    "conv_large": 29_585_064,
    "hybrid_medium": 8_314_608,
    "hybrid_large": 34_758_824,
}
CHANNELS = {
    "conv_small": (32, 64, 96, 128),
    "conv_medium": (48, 80, 160, 256),
    "conv_large": (48, 96, 192, 512),
    "hybrid_medium": (48, 80, 160, 256),
    "hybrid_large": (48, 96, 192, 512),
}
YAML_NAMES = {
    "conv_small": "MobileNetV4ConvSmall",
    "conv_medium": "MobileNetV4ConvMedium",
    "conv_large": "MobileNetV4ConvLarge",
    "hybrid_medium": "MobileNetV4HybridMedium",
    "hybrid_large": "MobileNetV4HybridLarge",
}


def count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_exact(variant: str) -> None:
    assert count(MobileNetV4(variant)) == PARAMS[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_declared_channels_strides_match_features(variant: str) -> None:
    model = MobileNetV4(variant).eval()
    assert model.out_channels == CHANNELS[variant] and model.strides == (4, 8, 16, 32)
    sizes = [(256, 256), (256, 384)]
    if variant.startswith("hybrid"):  # attention at any size: 480x640 and 250x330 padded up to multiples of 32
        sizes += [(480, 640), (256, 352)]
    assert_declared_shapes(model, sizes)


def test_structure_per_variant() -> None:
    small, hybrid_l, hybrid_m = MobileNetV4("conv_small"), MobileNetV4("hybrid_large"), MobileNetV4("hybrid_medium")
    assert not any(isinstance(m, (LayerScale, MobileMQA)) for m in small.modules())
    assert any(isinstance(m, nn.GELU) for m in hybrid_l.modules()) and not any(isinstance(m, nn.ReLU) for m in hybrid_l.modules())
    assert not any(isinstance(m, nn.GELU) for m in hybrid_m.modules())
    mqa_m = [m.attn for m in hybrid_m.modules() if isinstance(m, MobileMQA)]
    assert [(a.heads, a.key_dim, a.kv_stride) for a in mqa_m] == [(4, 64, 2)] * 4 + [(4, 64, 1)] * 4
    mqa_l = [m.attn for m in hybrid_l.modules() if isinstance(m, MobileMQA)]
    assert [(a.heads, a.key_dim, a.kv_stride) for a in mqa_l] == [(8, 48, 2)] * 4 + [(8, 64, 1)] * 4
    uibs = [m for m in hybrid_m.modules() if isinstance(m, UIB)]
    assert all(isinstance(u.layer_scale, LayerScale) for u in uibs)
    assert all(u.residual == (u.pw_proj.conv.out_channels == u.pw_exp.conv.in_channels and not _strided(u)) for u in uibs)


def _strided(block: UIB) -> bool:
    """Whether any conv inside the UIB has stride 2."""
    return any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in block.modules())


def naive_mqa(attn: MultiQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Textbook multi-query attention, written independently with einsum, for checking the module."""
    b, c, h, w = x.shape
    q = attn.query(x).reshape(b, attn.heads, attn.key_dim, h * w)  # channels grouped per head
    k = attn.key(x).flatten(2)  # (B, d, P)
    v = attn.value(x).flatten(2)
    logits = torch.einsum("bhdn,bdp->bhnp", q, k) / attn.key_dim**0.5
    o = torch.einsum("bhnp,bdp->bhdn", logits.softmax(-1), v)
    return attn.output(o.reshape(b, attn.heads * attn.key_dim, h, w))


@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 5), (6, 6), (3, 11)])
def test_mqa_matches_naive_for_any_size(kv_stride: int, hw: tuple[int, int]) -> None:
    attn = calibrate_bn(MultiQueryAttention(16, heads=4, key_dim=8, kv_stride=kv_stride), (4, 16, *hw))
    x = random_images((2, 16, *hw), seed=100)
    tol = rounding_tol(attn)
    with torch.no_grad():
        out = attn(x)
        assert out.shape == x.shape
        assert rel_err(out, naive_mqa(attn, x)) < tol
        # positions are not mixed across batch items
        assert rel_err(attn(x[1:]), out[1:]) < tol


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_parity(variant: str) -> None:
    timm = pytest.importorskip("timm")
    ref = calibrate_bn(timm.create_model(f"mobilenetv4_{variant}", pretrained=False), (4, 3, 96, 160), seed=1).double()
    ours = MobileNetV4(variant)
    mapped, unused = ours.convert_state_dict(ref.state_dict())
    result = ours.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {k.split(".")[0] for k in unused} <= {"blocks", "conv_head", "norm_head", "classifier"}
    assert all(k.startswith("blocks.4.") for k in unused if k.startswith("blocks"))  # only the 960 conv
    ours = ours.double().eval()
    x = random_images((1, 3, 96, 160), seed=100, dtype=torch.float64)
    with torch.no_grad():
        y = ref.bn1(ref.conv_stem(x))
        expected = []
        for stage in ref.blocks[:4]:
            y = stage(y)
            expected.append(y)
        got = ours(x)
    tol = rounding_tol(ours, torch.float64)  # same maths in float64: only summation order may differ
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        assert rel_err(b, a) < tol


def test_out_indices_in_channels_and_errors() -> None:
    model = MobileNetV4("conv_medium", in_channels=1, out_indices=(1, 2)).eval()
    assert model.out_channels == (80, 160) and model.strides == (8, 16) and len(model.stages) == 3
    with torch.no_grad():
        feats = model(torch.randn(1, 1, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 80, 8, 12), (1, 160, 4, 6)]
    with pytest.raises(ValueError, match="conv_small.*hybrid_large"):
        MobileNetV4("conv_tiny")
    with pytest.raises(ValueError, match="out_indices"):
        MobileNetV4("conv_small", out_indices=(3, 1))


def test_drop_path_only_in_training() -> None:
    model = calibrate_bn(MobileNetV4("conv_small", drop_path_rate=0.5), (16, 3, 64, 64))
    x = random_images((4, 3, 64, 64), seed=100)
    with torch.no_grad():
        eval_out = model(x)[-1]
        for m in model.modules():  # train only the DropPath modules so BN statistics stay fixed
            m.training = type(m).__name__ == "DropPath"
        train_outs = [model(x)[-1] for _ in range(2)]
    assert not torch.allclose(train_outs[0], train_outs[1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], eval_out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_registry_names(variant: str) -> None:
    spec = get_module(YAML_NAMES[variant])
    assert spec.kind == "backbone"
    assert spec.cls(in_channels=3).variant == variant
    generic = get_module("MobileNetV4")
    assert generic.cls(variant, in_channels=3).out_channels == CHANNELS[variant]


def test_gradients_reach_every_parameter() -> None:
    model = calibrate_bn(MobileNetV4("hybrid_medium"), (8, 3, 64, 64)).train()
    loss = sum(f.square().mean() for f in model(random_images((2, 3, 64, 64), seed=100)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
