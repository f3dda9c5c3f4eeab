"""Classify head and the shipped classifier configs: exact parameter counts, every registered backbone under the head,
the three tails (YOLOv5, timm MobileNetV4, MobileOne), fusion and one-line config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from models.heads.base import head_class
from models.heads.classify import Classify
from models.model import ClassificationModel, DetectionModel, load_model_config
from models.parse import ModelConfigError, parse_model
from models.registry import registered
from tests.conftest import calibrate_bn, random_images, rel_err, rounding_tol

MODELS = Path(__file__).resolve().parents[1] / "models"
BACKBONES = [spec.name for spec in registered("backbone")]

# timm's whole-classifier counts (backbones.md); MobileOne: training-form backbone + Linear(/32 channels, 1000)
MNV4_PARAMS = {"conv_small": 3_774_024, "conv_medium": 9_715_512, "conv_large": 32_590_864, "hybrid_medium": 11_074_648,
               "hybrid_large": 37_764_624}
MOBILEONE_BACKBONE = {0: (4_268_272, 1024), 1: (3_544_192, 1280), 2: (5_835_648, 2048), 3: (8_121_600, 2048), 4: (12_902_248, 2048)}
MOBILEONE_PARAMS = {i: n + c * 1000 + 1000 for i, (n, c) in MOBILEONE_BACKBONE.items()}


def meta_params(cfg: str) -> int:
    """Parameters of the layers parse_model builds for a shipped config (the modules DetectionModel holds), on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in parse_model(load_model_config(MODELS / cfg)).layers.parameters())


def classifier_cfg(backbone: str, head_args: list[Any], nc: int = 3) -> dict[str, Any]:
    """A classifier config dict: `backbone` at row 0 (feature maps at indices 1-4), Classify on the stride-32 map (index 4)."""
    return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "backbone": [[-1, 1, backbone, []]],
            "head": [[4, 1, "Classify", head_args]]}


def assert_fuse_keeps_eval_output(model: DetectionModel, size: int = 64) -> None:
    """Calibrate BN statistics (8 x 64 x 64: 32 values per channel at stride 32), then fuse() in place: the eval-mode
    probabilities sum to 1 and stay within float32 rounding of the unfused ones."""
    calibrate_bn(model, (8, 3, size, size), steps=2)
    x = random_images((2, 3, size, size), seed=100)
    with torch.no_grad():
        before = model(x)
        after = model.fuse()(x)
    assert before.shape == (2, model.head.nc) and torch.allclose(before.sum(1), torch.ones(2)) and (before >= 0).all()
    assert rel_err(after, before) < rounding_tol(model)


@pytest.mark.parametrize("variant", sorted(MNV4_PARAMS))
def test_mobilenetv4_classifier_params_equal_timm(variant: str) -> None:
    assert meta_params(f"mobilenetv4_{variant}-cls.yaml") == MNV4_PARAMS[variant]


@pytest.mark.parametrize("i", sorted(MOBILEONE_PARAMS))
def test_mobileone_classifier_params(i: int) -> None:
    assert meta_params(f"mobileone_s{i}-cls.yaml") == MOBILEONE_PARAMS[i]


def test_meta_count_is_the_built_model() -> None:
    model = ClassificationModel(MODELS / "mobilenetv4_conv_small-cls.yaml")
    assert sum(p.numel() for p in model.parameters()) == MNV4_PARAMS["conv_small"]
    assert model.head_kind == "classify" and model.task == "classify" and model.stride.tolist() == [32.0]
    assert head_class("classify") is Classify and model.head.nc == 1000 and model.head.nl == 1


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_under_classify(backbone: str) -> None:
    """YOLOv5's tail (1x1 conv, pool, linear) on each registered backbone's stride-32 map: logits, probabilities, fusion."""
    model = DetectionModel(classifier_cfg(backbone, ["nc", 32]))
    assert isinstance(model.head, Classify) and model.routes[-1] == 4 and model.stride.tolist() == [32.0]
    model.train()
    logits = model(random_images((1, 3, 64, 64)))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert_fuse_keeps_eval_output(model)


@pytest.mark.parametrize("head_args, hidden, pool_first", [(["nc", 1280, 1], 1280, True), (["nc", 0], 0, False)])
def test_timm_and_mobileone_tails(head_args: list[Any], hidden: int, pool_first: bool) -> None:
    cfg = classifier_cfg("MobileNetV4ConvSmall", head_args)
    cfg["activation"] = "nn.ReLU()"
    model = DetectionModel(cfg)
    head = model.head
    assert isinstance(head, Classify) and head.pool_first is pool_first
    assert head.linear.in_features == (hidden or 128) and head.linear.out_features == 3
    assert isinstance(head.conv, nn.Identity) if not hidden else isinstance(head.conv.act, nn.ReLU)
    model.train()
    assert model(random_images((2, 3, 64, 64))).shape == (2, 3)  # BN after pooling needs more than one sample
    assert_fuse_keeps_eval_output(model)


@pytest.mark.parametrize("cfg, act", [("mobilenetv4_conv_small-cls.yaml", nn.ReLU), ("mobilenetv4_hybrid_large-cls.yaml", nn.GELU),
                                      ("yolov5n-cls.yaml", nn.SiLU)])
def test_hidden_conv_takes_the_config_activation(cfg: str, act: type[nn.Module]) -> None:
    config = yaml.safe_load((MODELS / cfg).read_text())
    if "mobilenetv4" in cfg:
        config["backbone"][0] = [-1, 1, "MobileNetV4ConvSmall", []]  # the activation comes from the config, not the backbone
    model = DetectionModel(config, nc=2)
    assert type(model.head.conv.act) is act


@pytest.mark.parametrize("size, params", [("n", 2_493_000), ("s", 5_453_480)])
def test_yolov5_classifiers_build_and_run(size: str, params: int) -> None:
    model = ClassificationModel(f"yolov5{size}-cls.yaml", nc=5)
    assert meta_params(f"yolov5{size}-cls.yaml") == params  # nc=1000, before Conv+BN fusion
    assert model.head.conv.conv.out_channels == 1280 and model.routes[-1] == -1 and model.stride.tolist() == [32.0]
    model.train()
    assert model(random_images((1, 3, 64, 96), normalise=False)).shape == (1, 5)
    model.eval()
    with torch.no_grad():
        probs = model(random_images((2, 3, 96, 64), normalise=False))
    assert probs.shape == (2, 5) and torch.allclose(probs.sum(1), torch.ones(2))


def test_info_summary_and_split_output_refusal() -> None:
    model = ClassificationModel("yolov5n-cls.yaml")
    line = model.info(imgsz=224)
    assert line.startswith("yolov5n-cls summary:") and "2,493,000 parameters" in line
    with pytest.raises(NotImplementedError, match="no boxes"):
        Classify.split_output(torch.zeros(1, 10))


@pytest.mark.parametrize("args, match", [
    ([0], r"takes \[nc, hidden, pool_first\], integers \(nc >= 1, hidden >= 0, pool_first >= 0\), got \[0\]"),
    (["nc", "wide"], "takes"), (["nc", -1], "takes"), (["nc", 1.5], "takes"), (["nc", 32, 0, 1], "takes"),
    (["nc", True], "takes"), (["nc", 32, 2], "pool_first must be 0"),
])
def test_bad_classify_rows_are_one_line_errors(args: list[Any], match: str) -> None:
    with pytest.raises(ModelConfigError, match=match) as info:
        DetectionModel(classifier_cfg("MobileNetV4ConvSmall", args))
    assert "\n" not in str(info.value) and str(info.value).startswith("layer 5 (Classify)")


def test_classify_takes_one_input_and_classifiers_need_it() -> None:
    cfg = classifier_cfg("MobileNetV4ConvSmall", ["nc", 0])
    cfg["head"][-1][0] = [3, 4]
    with pytest.raises(ModelConfigError, match="one input feature map") as info:
        DetectionModel(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelConfigError, match="last layer must be Classify"):
        ClassificationModel("yolov5n.yaml")
