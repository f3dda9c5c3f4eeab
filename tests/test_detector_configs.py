"""Every shipped detector config builds, runs at square and non-square sizes, and fuses without changing outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.mobileone import MobileOneUnit
from models.model import DetectionModel
from tests.conftest import TUTORIAL_YAML, calibrate_bn, random_images, rel_err, rounding_tol

MODELS = Path(__file__).resolve().parents[1] / "models"
MOBILE_CONFIGS = sorted(p.name for p in MODELS.glob("yolov5*_mobile*.yaml"))
YOLOV5S_PARAMS, YOLOV5S_GFLOPS = 7_235_389, 16.4


def test_one_config_per_variant() -> None:
    expected = {f"yolov5s_mobilenetv4_{v}.yaml" for v in ("conv_small", "conv_medium", "conv_large", "hybrid_medium", "hybrid_large")}
    expected |= {f"yolov5s_mobileone_s{i}.yaml" for i in range(5)}
    expected |= {"yolov5_mobilenetv4.yaml", "yolov5n_mobilenetv4_conv_small.yaml", "yolov5n_mobileone_s0.yaml"}
    assert expected <= set(MOBILE_CONFIGS)


@pytest.mark.parametrize("cfg", MOBILE_CONFIGS)
def test_config_builds_runs_and_fuses(cfg: str) -> None:
    model = DetectionModel(MODELS / cfg, nc=4).eval()
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 320, 320))[0]
    anchor_based = model.head_kind in ("anchor_based", "segment")  # Segment = anchor-based Detect + nm mask coefficients
    n = (40 * 40 + 20 * 20 + 10 * 10) * (3 if anchor_based else 1)  # 3 anchors per cell, or one point
    assert out.shape == ((1, n, 9 + getattr(model.head, "nm", 0)) if anchor_based else (1, 8, n))
    shape = (1, 3, 320, 480)
    calibrate_bn(model, (2, *shape[1:]), steps=2, normalise=False)
    x = random_images(shape, seed=100, normalise=False)
    with torch.no_grad():
        before = _raw_outputs(model(x))
        model.fuse()
        after = _raw_outputs(model(x))
    # only the MQA pre-norm stays: it feeds a zero-padded depthwise conv, so it cannot be folded exactly
    leftover = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(n.endswith(".norm") for n in leftover)
    assert not any(isinstance(m, MobileOneUnit) and not m.is_fused for m in model.modules())
    tol = rounding_tol(model)  # both forms in float32: each within the rounding bound of the exact result
    assert all(rel_err(a, b) < tol for a, b in zip(after, before))


def _raw_outputs(out: tuple) -> list[torch.Tensor]:
    """Per-level raw outputs, plus a segmentation head's prototypes (its eval output is (decoded, protos, raw))."""
    return [*out[-1], *out[1:-1]]


@pytest.mark.parametrize("cfg", ["yolov5_mobilenetv4.yaml", "yolov5s_mobileone_s0.yaml"])
def test_light_detectors_lighter_than_yolov5s(cfg: str) -> None:
    from models.flops import count_gflops

    model = DetectionModel(MODELS / cfg).fuse()  # MobileOne is deployed in its re-parameterised form
    assert sum(p.numel() for p in model.parameters()) < YOLOV5S_PARAMS
    assert count_gflops(model, 640) < YOLOV5S_GFLOPS


def test_tutorial_yaml_with_real_backbone() -> None:
    import yaml

    model = DetectionModel(yaml.safe_load(TUTORIAL_YAML.format(backbone="MobileNetV4ConvSmall"))).eval()
    assert [r.index for r in model.layer_rows][:6] == [0, 1, 2, 3, 4, 5]
    assert [r.module for r in model.layer_rows][5] == "SPPF"
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 384))[0]
    assert out.shape == (1, 3 * (32 * 48 + 16 * 24 + 8 * 12), 85)
