"""Backbone weight loading: timm and Apple checkpoints from local files reach the detector's backbone exactly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from models.mobilenetv4 import MobileNetV4
from models.model import DetectionModel
from models.pretrained import BackboneWeightsError, find_backbone, load_backbone_weights
from tests.conftest import calibrate_bn, random_images, rel_err, rounding_tol

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_timm_mobilenetv4_file_into_detector(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    ref = calibrate_bn(timm.create_model("mobilenetv4_conv_small", pretrained=False), (8, 3, 64, 96))
    path = tmp_path / "mnv4.pth"
    torch.save(ref.state_dict(), path)
    model = DetectionModel(MODELS / "yolov5_mobilenetv4.yaml", nc=3).eval()
    report = load_backbone_weights(model, path)
    assert report.missing == [] and report.loaded == len(find_backbone(model).state_dict())
    assert {k.split(".")[0] for k in report.unused} == {"blocks", "conv_head", "norm_head", "classifier"}
    backbone, ref = find_backbone(model).double(), ref.double()  # float64 isolates mapping errors from rounding
    x = random_images((1, 3, 64, 96), seed=100, dtype=torch.float64)
    with torch.no_grad():
        y = ref.bn1(ref.conv_stem(x))
        for stage in ref.blocks[:4]:
            y = stage(y)
        assert rel_err(backbone(x)[-1], y) < rounding_tol(backbone, torch.float64)


def test_apple_mobileone_file_with_wrapper(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from tests.test_mobileone import timm_to_apple

    ref = calibrate_bn(timm.create_model("mobileone_s0", pretrained=False), (16, 3, 64, 64))
    apple = {"state_dict": {timm_to_apple(k): v for k, v in ref.state_dict().items()}}
    torch.save(apple, tmp_path / "mobileone_s0_unfused.pth.tar")
    model = DetectionModel(MODELS / "yolov5s_mobileone_s0.yaml", nc=3).eval()
    report = load_backbone_weights(model, tmp_path / "mobileone_s0_unfused.pth.tar")
    assert report.missing == [] and report.unused == ["linear.bias", "linear.weight"]
    backbone, ref = find_backbone(model).double(), ref.double()  # float64 isolates mapping errors from rounding
    x = random_images((1, 3, 64, 64), seed=100, dtype=torch.float64)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
        assert rel_err(backbone(x)[-1], expected) < rounding_tol(backbone, torch.float64)


def test_errors_are_one_line(tmp_path: Path) -> None:
    model = DetectionModel(MODELS / "yolov5n_mobilenetv4_conv_small.yaml", nc=2)
    with pytest.raises(BackboneWeightsError, match="not found"):
        load_backbone_weights(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="junk.pth: not a readable") as e:
        load_backbone_weights(model, tmp_path / "junk.pth")
    assert "\n" not in str(e.value)
    torch.save(DetectionModel("yolov5n.yaml", nc=2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(BackboneWeightsError, match="no tensor matches"):
        load_backbone_weights(model, tmp_path / "other.pt")
    with pytest.raises(BackboneWeightsError, match="no MobileNetV4/MobileOne backbone"):
        load_backbone_weights(DetectionModel("yolov5n.yaml", nc=2), tmp_path / "other.pt")


def test_variant_mismatch_reports_missing(tmp_path: Path) -> None:
    torch.save(MobileNetV4("conv_medium").state_dict(), tmp_path / "medium.pt")
    report = load_backbone_weights(MobileNetV4("hybrid_medium"), tmp_path / "medium.pt")
    assert report.loaded > 0 and report.missing  # MQA blocks have no counterpart in conv_medium


def test_timm_name_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")

    def offline(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(BackboneWeightsError, match="timm:mobilenetv4_conv_small: cannot reach huggingface.co"):
        load_backbone_weights(MobileNetV4("conv_small"), "timm:mobilenetv4_conv_small")
