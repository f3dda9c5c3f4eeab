"""Tests for the MobileOne backbone: sizes, re-parameterisation, gradients and checkpoint mapping."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from torch import nn

from models.mobileone import MobileOne, MobileOneUnit
from models.registry import get_module
from models.reparam import reparameterize_model
from tests.conftest import assert_declared_shapes, calibrate_bn, random_images, rel_err, rounding_tol

VARIANTS = ("s0", "s1", "s2", "s3", "s4")
PARAMS = {  # (training form, re-parameterised), from the reference table
    "s0": (4_268_272, 1_053_504),
    "s1": (3_544_192, 3_483_840),
    "s2": (5_835_648, 5_759_168),
    "s3": (8_121_600, 8_029_312),
    "s4": (12_902_248, 12_789_352),
}
CHANNELS = {
    "s0": (48, 128, 256, 1024),
    "s1": (96, 192, 512, 1280),
    "s2": (96, 256, 640, 2048),
    "s3": (128, 320, 768, 2048),
    "s4": (192, 448, 896, 2048),
}
SIZE = (96, 160)  # test images; models are BN-calibrated at this size


def count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _calibrated(variant: str) -> MobileOne:
    return calibrate_bn(MobileOne(variant), (4, 3, *SIZE))


def calibrated(variant: str) -> MobileOne:
    """A fresh copy of MobileOne `variant` with random BN affines and statistics calibrated on SIZE images, in eval mode."""
    return copy.deepcopy(_calibrated(variant))


def timm_to_apple(key: str) -> str:
    """Rename a timm MobileOne key to Apple's reference naming."""
    key = re.sub(r"^stem\.", "stage0.", key)
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
    pairs = (
        ("conv_kxk.", "rbr_conv."),
        ("conv_scale.", "rbr_scale."),
        ("identity.", "rbr_skip."),
        ("attn.fc1.", "se.reduce."),
        ("attn.fc2.", "se.expand."),
        ("head.fc.", "linear."),
    )
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def ours_fused_to_apple(key: str) -> str:
    """Rename one of our fused-model keys to Apple's fused naming."""
    key = re.sub(r"^stem\.", "stage0.", key)
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
    return key.replace(".fused.", ".reparam_conv.")


def timm_pair(variant: str) -> tuple[nn.Module, MobileOne]:
    """A BN-calibrated timm model and our model loaded from its state_dict."""
    timm = pytest.importorskip("timm")
    ref = calibrate_bn(timm.create_model(f"mobileone_{variant}", pretrained=False), (4, 3, 128, 128), steps=2, seed=1)
    ours = MobileOne(variant)
    mapped, unused = ours.convert_state_dict(ref.state_dict())
    result = ours.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sorted(unused) == ["head.fc.bias", "head.fc.weight"]
    return ref, ours.eval()


def timm_features(ref: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's four stage outputs (index 0 is the stem)."""
    return ref.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts(variant: str) -> None:
    model = MobileOne(variant)
    assert count(model) == PARAMS[variant][0]
    reparameterize_model(model)
    assert count(model) == PARAMS[variant][1]
    reparameterize_model(model)  # idempotent
    assert count(model) == PARAMS[variant][1]
    assert count(MobileOne(variant, inference_mode=True)) == PARAMS[variant][1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_declared_channels_and_strides_match_features(variant: str) -> None:
    model = MobileOne(variant).eval()
    assert model.out_channels == CHANNELS[variant]
    assert model.strides == (4, 8, 16, 32)
    sizes = [(256, 256), (256, 384)]
    assert_declared_shapes(model, sizes)


def test_out_indices_subset_and_in_channels() -> None:
    model = MobileOne("s1", in_channels=4, out_indices=[1, 3]).eval()
    assert model.out_channels == (192, 1280) and model.strides == (8, 32)
    with torch.no_grad():
        feats = model(torch.randn(1, 4, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 8, 12), (1, 1280, 2, 3)]
    with pytest.raises(ValueError, match="out_indices"):
        MobileOne("s0", out_indices=(2, 1))


def test_unknown_variant_lists_known() -> None:
    with pytest.raises(ValueError, match="s0.*s4"):
        MobileOne("s9")


def test_registry_names() -> None:
    for variant in VARIANTS:
        spec = get_module(f"MobileOne{variant.upper()}")
        assert spec.kind == "backbone"
        assert spec.cls(in_channels=3).variant == variant
    generic = get_module("MobileOne")
    assert generic.kind == "backbone"
    assert generic.cls("s2", in_channels=3).out_channels == CHANNELS["s2"]
    assert get_module("MobileOneS0").cls(in_channels=3, out_indices=(2, 3)).out_channels == (256, 1024)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reparameterisation_equivalence(variant: str) -> None:
    model = calibrated(variant)
    x = random_images((2, 3, *SIZE), seed=100)
    fused = reparameterize_model(copy.deepcopy(model))
    assert all(u.is_fused for u in fused.units().values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    tol32, tol64 = rounding_tol(fused, torch.float32), rounding_tol(fused, torch.float64)
    with torch.no_grad():
        model64 = model.double()
        truth = model64(x.double())  # the training form in float64 is the reference
        exact = reparameterize_model(model64)(x.double())
        deployed = fused(x)
        fused.stem.fused.bias.zero_()  # a fold that drops the bias must fail the same check
        broken = fused(x)
    for t, e, d, b in zip(truth, exact, deployed, broken):
        assert rel_err(e, t) < tol64  # the fold is exact up to float64 rounding
        assert rel_err(d, t) < tol32  # and the float32 fused model is as accurate as float32 allows
        assert rel_err(b, t) > 10 * tol32


@pytest.mark.parametrize("kernel,groups,c1,c2", [(1, 1, 8, 8), (3, 8, 8, 8), (5, 4, 8, 8), (1, 1, 8, 16)])
def test_unit_reparameterisation_exact(kernel: int, groups: int, c1: int, c2: int) -> None:
    unit = MobileOneUnit(c1, c2, kernel, 1, groups, num_branches=2)
    assert (unit.skip is not None) == (c1 == c2)
    assert (unit.scale is not None) == (kernel > 1)
    calibrate_bn(unit, (4, c1, 11, 13))
    x = random_images((2, c1, 11, 13), seed=100)
    with torch.no_grad():
        before = unit(x)
        fused = copy.deepcopy(unit)
        fused.reparameterize()
        assert len(list(fused.parameters())) == 2 and fused.fused.bias is not None
        tol = rounding_tol(fused)
        assert rel_err(fused(x), before) < tol
        if unit.skip is not None:  # the identity branch must contribute
            unit.skip.bias.add_(1.0)
            assert rel_err(unit(x), before) > 100 * tol


def test_pointwise_units_have_identity_branch() -> None:
    model = MobileOne("s0")
    pointwise = [u for u in model.units().values() if u.kernel_size == 1]
    same = [u for u in pointwise if u.in_channels == u.out_channels]
    # s0: 2+8+10+1 pointwise units; all but the first of stages 2-4 keep their width (2+7+9)
    assert len(pointwise) == 21 and len(same) == 18
    assert all(u.skip is not None for u in same)
    assert all(u.skip is None for u in pointwise if u.in_channels != u.out_channels)


@pytest.mark.parametrize("variant", ["s0", "s4"])
def test_every_parameter_gets_gradient(variant: str) -> None:
    torch.manual_seed(0)
    model = MobileOne(variant).train()
    loss = sum(f.square().mean() for f in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_walker_converts_nested_backbone() -> None:
    wrapper = nn.Sequential(calibrated("s0")).double()  # float64: the conversion must be exact
    x = random_images((1, 3, *SIZE), seed=100, dtype=torch.float64)
    with torch.no_grad():
        before = wrapper(x)
        reparameterize_model(wrapper)
        after = wrapper(x)
        reparameterize_model(wrapper)
        again = wrapper(x)
    units = wrapper[0].units()
    assert len(units) == 1 + 2 * sum((2, 8, 10, 1)) and all(u.is_fused for u in units.values())
    tol = rounding_tol(wrapper, torch.float64)
    assert all(rel_err(a, b) < tol for a, b in zip(after, before))
    assert all(torch.equal(a, b) for a, b in zip(after, again))


def test_own_keys_pass_through_and_wrappers() -> None:
    src = calibrated("s0")
    sd = src.state_dict()
    mapped, unused = MobileOne("s0").convert_state_dict({"model": {f"module.{k}": v for k, v in sd.items()}})
    assert unused == [] and mapped.keys() == sd.keys()
    assert all(torch.equal(mapped[k], sd[k]) for k in sd)


def test_mismatched_shapes_are_unused() -> None:
    mapped, unused = MobileOne("s1").convert_state_dict(MobileOne("s0").state_dict())
    assert "stem.convs.0.conv.weight" in unused and "stem.convs.0.conv.weight" not in mapped
    assert "stages.0.0.convs.1.conv.weight" in unused  # s0 has 4 branches, s1 one


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_parity(variant: str) -> None:
    ref, ours = timm_pair(variant)
    ref, ours = ref.double(), ours.double()  # float64 isolates mapping errors from float32 summation-order noise
    x = random_images((1, 3, 128, 128), seed=100, dtype=torch.float64)
    with torch.no_grad():
        expected = timm_features(ref, x)
        got = ours(x)
    assert len(got) == 4
    tol = rounding_tol(ours, torch.float64)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        assert rel_err(b, a) < tol


@pytest.mark.parametrize("variant", ["s0", "s4"])
def test_apple_training_checkpoint(variant: str) -> None:
    ref, via_timm = timm_pair(variant)
    apple = {f"module.{timm_to_apple(k)}": v for k, v in ref.state_dict().items()}
    assert any(k.startswith("module.stage1.0.rbr_conv.0.conv") for k in apple)
    model = MobileOne(variant)
    mapped, unused = model.convert_state_dict({"state_dict": apple})
    result = model.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and sorted(unused) == ["linear.bias", "linear.weight"]
    x = random_images((1, 3, 64, 96), seed=100)
    tol = rounding_tol(model)  # same architecture and weights: only rounding may differ
    with torch.no_grad():
        for a, b in zip(via_timm(x), model.eval()(x)):
            assert rel_err(b, a) < tol


@pytest.mark.parametrize("variant", ["s0", "s4"])
def test_apple_fused_checkpoint(variant: str) -> None:
    src = reparameterize_model(calibrated(variant))
    x = random_images((1, 3, *SIZE), seed=100)
    with torch.no_grad():
        expected = src(x)
    tol = rounding_tol(src)
    fused = {ours_fused_to_apple(k): v for k, v in src.state_dict().items()}
    assert "stage0.reparam_conv.weight" in fused and "stage4.1.reparam_conv.bias" in fused
    fused["linear.weight"] = torch.zeros(10, CHANNELS[variant][-1])

    training = MobileOne(variant)
    with pytest.warns(UserWarning, match="fused"):
        mapped, unused = training.convert_state_dict(fused)
    inference = MobileOne(variant, inference_mode=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped_inf, unused_inf = inference.convert_state_dict(fused)
    for model, sd, extra in ((training, mapped, unused), (inference, mapped_inf, unused_inf)):
        result = model.load_state_dict(sd, strict=False)
        assert result.missing_keys == [] and extra == ["linear.weight"]
        assert count(model) == PARAMS[variant][1]
        with torch.no_grad():
            for a, b in zip(expected, model.eval()(x)):
                assert rel_err(b, a) < tol


def test_training_checkpoint_into_inference_model() -> None:
    src = calibrated("s0")
    model = MobileOne("s0", inference_mode=True)
    mapped, unused = model.convert_state_dict(src.state_dict())
    result = model.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and unused == []
    x = random_images((1, 3, *SIZE), seed=100)
    tol = rounding_tol(model)  # the fold on load happens in float32
    with torch.no_grad():
        for a, b in zip(src(x), model.eval()(x)):
            assert rel_err(b, a) < tol
