"""RT-DETR's RepConv and RepC3: parameter counts, shapes, re-parameterisation equivalence and yaml building."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.blocks.conv import Conv
from models.blocks.repconv import RepC3, RepConv
from models.parse import parse_model
from models.registry import get_module
from models.reparam import reparameterize_model
from tests.conftest import EPS32, calibrate_bn, rel_err, rounding_tol

SIZE = 16  # spatial size of the test inputs (and of the BN calibration batches)
CALIBRATION_STEPS = 8


def count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def calibrated(model: nn.Module, channels: int) -> nn.Module:
    """`model` with random BN affines and running statistics from 8 train-mode batches of random inputs, in eval mode."""
    return calibrate_bn(model, (4, channels, SIZE, SIZE), steps=CALIBRATION_STEPS)


def assert_same_function(model: nn.Module, channels: int, convert: object = reparameterize_model) -> nn.Module:
    """Re-parameterise a copy of the calibrated `model` and check it computes the same outputs; returns the copy."""
    x = torch.randn(2, channels, SIZE, SIZE)
    fused = copy.deepcopy(model)
    assert callable(convert)
    convert(fused)
    with torch.no_grad():
        ref, got = model(x), fused(x)
    # Both forms compute the same function and differ only in float32 rounding. A length-n dot product has a relative
    # error of ~EPS32 * sqrt(n) (rounding errors add like a random walk), and with BN-calibrated states (gain ~1 per
    # layer) the errors of L chained convs add to ~EPS32 * sqrt(max fan-in) * L of the output scale (rel_err divides by
    # max|ref|). rounding_tol computes exactly that with a safety factor k = 16 (see its docstring), measured on the fused
    # model (one conv per RepConv). A real fusion error (a dropped bias or branch, a BN eps mix-up) is orders larger.
    tol = rounding_tol(fused)
    assert tol < 1e4 * EPS32  # sanity: the bound stays a rounding-level one for these small blocks
    assert got.shape == ref.shape
    assert rel_err(got, ref) < tol, (rel_err(got, ref), tol)
    return fused


def test_parameter_counts() -> None:
    assert count(RepC3(256, 256, 3, 0.5)) == 592_384
    assert count(RepC3(512, 256, 3, 0.5)) == 657_920


def test_registered_for_yaml() -> None:
    rep_c3, rep_conv = get_module("RepC3"), get_module("RepConv")
    assert (rep_c3.cls, rep_c3.kind, rep_c3.takes_act) == (RepC3, "csp", False)
    assert (rep_conv.cls, rep_conv.kind, rep_conv.takes_act, rep_conv.stride_arg) == (RepConv, "conv", True, 3)


@pytest.mark.parametrize(("s", "size", "out"), [(1, 20, 20), (2, 20, 10), (2, 21, 11)])
def test_repconv_output_shape(s: int, size: int, out: int) -> None:
    model = RepConv(8, 16, 3, s).eval()
    assert model(torch.randn(1, 8, size, size)).shape == (1, 16, out, out)
    reparameterize_model(model)
    assert model(torch.randn(1, 8, size, size)).shape == (1, 16, out, out)


def test_identity_branch_only_when_shape_preserving() -> None:
    assert isinstance(RepConv(8, 8, bn=True).bn, nn.BatchNorm2d)
    assert RepConv(8, 8).bn is None
    assert RepConv(8, 16, bn=True).bn is None
    assert RepConv(8, 8, s=2, bn=True).bn is None
    with pytest.raises(ValueError, match="odd kernel"):
        RepConv(8, 8, k=5, p=1)


@pytest.mark.parametrize(
    ("c1", "c2", "s", "g", "bn"), [(16, 16, 1, 1, False), (16, 16, 1, 1, True), (8, 16, 2, 1, True), (16, 16, 1, 4, True)]
)
def test_repconv_reparameterize_equivalence(c1: int, c2: int, s: int, g: int, bn: bool) -> None:
    model = calibrated(RepConv(c1, c2, 3, s, g=g, bn=bn), c1)
    assert (model.bn is not None) == (bn and c1 == c2 and s == 1)
    fused = assert_same_function(model, c1)
    assert isinstance(fused, RepConv) and fused.is_fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].bias is not None and convs[0].groups == g


def test_repconv_reparameterize_after_inner_convs_folded() -> None:
    """The inner Convs may already be BN-folded (bn = Identity, conv with bias) when RepConv is fused."""

    def fold_inner_then_fuse(m: nn.Module) -> None:
        assert isinstance(m, RepConv) and isinstance(m.conv1, Conv) and isinstance(m.conv2, Conv)
        m.conv1.reparameterize()
        m.conv2.reparameterize()
        assert isinstance(m.conv1.bn, nn.Identity) and m.conv1.conv.bias is not None
        m.reparameterize()

    model = calibrated(RepConv(16, 16, bn=True), 16)
    fused = assert_same_function(model, 16, convert=fold_inner_then_fuse)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1


def test_reparameterize_twice_is_noop() -> None:
    model = calibrated(RepConv(16, 16, bn=True), 16)
    model.reparameterize()
    conv, state = model.conv, copy.deepcopy(model.state_dict())
    model.reparameterize()
    reparameterize_model(model)
    assert model.conv is conv
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize(("c1", "c2", "e"), [(16, 32, 0.5), (16, 16, 1.0)])
def test_repc3_reparameterize_equivalence(c1: int, c2: int, e: float) -> None:
    model = calibrated(RepC3(c1, c2, 3, e), c1)
    assert isinstance(model.cv3, nn.Identity) == (int(c2 * e) == c2)
    fused = assert_same_function(model, c1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(isinstance(m, RepConv) and m.is_fused for m in fused.m)


def test_yaml_built_layers() -> None:
    cfg = {
        "nc": 1,
        "backbone": [[-1, 1, "Conv", [64, 3, 2]]],
        "head": [[-1, 3, "RepC3", [64, 0.5]], [-1, 1, "RepConv", [64, 3, 2]]],
    }
    parsed = parse_model(cfg, ch=3)
    conv, rep_c3, rep_conv = parsed.layers
    assert (type(conv), type(rep_c3), type(rep_conv)) == (Conv, RepC3, RepConv)
    assert parsed.channels == [64, 64, 64] and parsed.strides == [2, 2, 4]
    assert parsed.rows[1].args == [64, 64, 3, 0.5] and parsed.rows[2].args == [64, 64, 3, 2]
    assert len(rep_c3.m) == 3 and rep_c3.cv1.conv.out_channels == 32 and isinstance(rep_c3.cv3, Conv)
    assert rep_conv.s == 2 and rep_conv.bn is None
    x = torch.randn(1, 3, 32, 32)
    for layer in parsed.layers:
        x = layer(x)
    assert x.shape == (1, 64, 8, 8)


def test_yaml_activation_reaches_repconv_only() -> None:
    """A config `activation` is passed to RepConv (takes_act); RepC3 has no act argument and builds unchanged."""
    cfg = {"nc": 1, "activation": "nn.ReLU()", "backbone": [[-1, 1, "RepConv", [16, 3, 1]]], "head": [[-1, 1, "RepC3", [16, 0.5]]]}
    rep_conv, rep_c3 = parse_model(cfg, ch=16).layers
    assert isinstance(rep_conv.act, nn.ReLU)
    assert isinstance(rep_c3, RepC3) and isinstance(rep_c3.m[0].act, nn.SiLU)
