"""The one Conv block (BatchNorm settings per family, activations by name) and the backbone variant registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models  # noqa: F401  (registers the built-in modules)
from models.backbone import Backbone, variant_name
from models.blocks.conv import TORCH_BN, YOLO_BN, Conv, make_activation
from models.model import DetectionModel
from models.registry import ModuleSpec, get_module, registered

VARIANT_BACKBONES = [spec for spec in registered("backbone") if spec.cls.__bases__[0] is not Backbone]


def test_variant_names() -> None:
    assert variant_name("MobileNetV4", "conv_small") == "MobileNetV4ConvSmall"
    assert variant_name("MobileOne", "s0") == "MobileOneS0"
    assert len(VARIANT_BACKBONES) == 10  # 5 MobileNetV4 + 5 MobileOne variants


@pytest.mark.parametrize("spec", VARIANT_BACKBONES, ids=lambda s: s.name)
def test_variant_class_fixes_its_variant(spec: ModuleSpec) -> None:
    family = spec.cls.__bases__[0]
    assert issubclass(spec.cls, family) and spec.cls.__name__ == spec.name
    assert get_module(family.__name__).cls is family
    fixed = spec.cls(out_indices=(3,))
    assert variant_name(family.__name__, fixed.variant) == spec.name
    assert fixed.out_channels == family(fixed.variant, out_indices=(3,)).out_channels
    with pytest.raises(TypeError):
        spec.cls(3)  # only keyword knobs: the variant is fixed


@pytest.mark.parametrize("name", ["MobileNetV4ConvSmall", "MobileNetV4HybridMedium", "MobileOneS0"])
def test_backbone_batchnorm_keeps_torch_settings(name: str) -> None:
    """BN eps/momentum change a trained model's numbers: the backbones keep PyTorch's (as timm and Apple train them)."""
    norms = [m for m in get_module(name).cls().modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.eps, m.momentum) == TORCH_BN for m in norms)


def test_yolov5_layers_keep_yolov5_batchnorm() -> None:
    model = DetectionModel("yolov5n.yaml")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.eps, m.momentum) == YOLO_BN for m in norms)


def test_activation_by_name_and_unknown_name() -> None:
    assert isinstance(make_activation("relu"), nn.ReLU) and isinstance(make_activation("gelu"), nn.GELU)
    assert isinstance(make_activation(False), nn.Identity) and isinstance(make_activation(True), nn.SiLU)
    with pytest.raises(ValueError, match="unknown activation 'swish'; known: relu, gelu, silu"):
        make_activation("swish")


def test_conv_reparameterize_is_exact_in_eval() -> None:
    torch.manual_seed(0)
    conv = Conv(4, 8, 3, 2, act="relu", bn=TORCH_BN)
    with torch.no_grad():
        conv.train()(torch.randn(8, 4, 16, 16))  # calibrate BN statistics
    x = torch.randn(2, 4, 16, 16)
    before = conv.eval()(x)
    conv.reparameterize()
    conv.reparameterize()  # idempotent
    assert isinstance(conv.bn, nn.Identity)
    # Each output is a 36-term sum (4 channels x 3x3) rounded in float32 both ways: 2 * 36 * eps of the output scale.
    tol = 2 * 36 * torch.finfo(torch.float32).eps * before.abs().max().item()
    assert torch.allclose(conv(x), before, atol=tol, rtol=0)
