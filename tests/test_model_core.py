"""Model core: YOLOv5 baselines, parse_model splicing, Detect decoding, fusion and bad configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from models.backbone import FeatureSelect
from models.flops import count_gflops
from models.heads.detect import Detect
from models.model import DetectionModel
from models.parse import ModelConfigError
from tests.conftest import TUTORIAL_YAML, calibrate_bn, random_images, rel_err, rounding_tol

MODELS = Path(__file__).resolve().parents[1] / "models"
BASELINES = {  # params, params after fuse, reference GFLOPs at 640
    "n": (1_872_157, 1_867_405, 4.6),
    "s": (7_235_389, 7_225_885, 16.6),
    "m": (21_190_557, 21_172_173, 49.2),
    "l": (46_563_709, 46_533_693, 109.6),
    "x": (86_749_405, 86_705_005, 206.3),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", list(BASELINES))
def test_baseline_param_counts_and_gflops(size):
    params, fused, gflops = BASELINES[size]
    model = DetectionModel(MODELS / f"yolov5{size}.yaml")
    assert n_params(model) == params
    # torch's flop counter counts convolutions only (no bias/BN adds): within 3% of the thop-based figure
    assert count_gflops(model, 640) == pytest.approx(gflops, rel=0.03)
    model.fuse()
    assert n_params(model) == fused


def test_yolov5s_output_shapes_square_and_rect():
    model = DetectionModel(MODELS / "yolov5n.yaml").eval()
    with torch.no_grad():
        pred, raw = model(torch.zeros(1, 3, 640, 640))
        assert pred.shape == (1, 25200, 85)
        assert [tuple(r.shape) for r in raw] == [(1, 3, 80, 80, 85), (1, 3, 40, 40, 85), (1, 3, 20, 20, 85)]
        pred, raw = model(torch.zeros(2, 3, 320, 480))
    assert pred.shape == (2, 3 * (40 * 60 + 20 * 30 + 10 * 15), 85)
    assert raw[0].shape == (2, 3, 40, 60, 85)
    model.train()
    out = model(torch.zeros(1, 3, 320, 480))
    assert isinstance(out, list) and out[2].shape == (1, 3, 10, 15, 85)


def test_strides_anchors_and_bias_init():
    model = DetectionModel(MODELS / "yolov5s.yaml", nc=3)
    det = model.detect
    assert det.stride.tolist() == [8.0, 16.0, 32.0]
    assert torch.allclose(det.anchors[0, 0] * 8, torch.tensor([10.0, 13.0]))
    assert torch.allclose(det.anchors[2, 2] * 32, torch.tensor([373.0, 326.0]))
    b = det.m[0].bias.view(3, -1).detach()
    assert b[:, 4].mean().item() == pytest.approx(torch.tensor(8 / 80**2).log().item(), abs=0.1)
    assert b[:, 5:].mean().item() == pytest.approx(torch.tensor(0.6 / (3 - 0.99)).log().item(), abs=0.1)
    assert model.detect.m[0].out_channels == 3 * 8


def test_reversed_anchors_are_reordered():
    cfg = yaml.safe_load((MODELS / "yolov5n.yaml").read_text())
    cfg["anchors"] = list(reversed(cfg["anchors"]))
    model = DetectionModel(cfg)
    assert torch.allclose(model.detect.anchors[0, 0] * 8, torch.tensor([10.0, 13.0]))


def test_anchors_buffer_follows_dtype_and_state_dict():
    model = DetectionModel(MODELS / "yolov5n.yaml")
    assert "model.24.anchors" in model.state_dict()
    assert "model.24.m.0.weight" in model.state_dict()
    assert model.double().detect.anchors.dtype == torch.float64


def test_fused_equals_unfused():
    shape = (1, 3, 128, 192)
    model = calibrate_bn(DetectionModel(MODELS / "yolov5n.yaml"), (2, *shape[1:]), normalise=False)
    x = random_images(shape, seed=100, normalise=False)
    fused = copy.deepcopy(model).fuse()
    tol32, tol64 = rounding_tol(fused, torch.float32), rounding_tol(fused, torch.float64)
    with torch.no_grad():
        truth = model.double()(x.double())[1]  # per-level raw outputs of the unfused model in float64
        exact = model.fuse()(x.double())[1]
        deployed = fused(x)[1]
        fused.model[0].conv.bias.zero_()  # a fold that drops the bias must fail the same check
        broken = fused(x)[1]
    for t, e, d, b in zip(truth, exact, deployed, broken):
        assert rel_err(e, t) < tol64  # folding is exact up to float64 rounding
        assert rel_err(d, t) < tol32
        assert rel_err(b, t) > 10 * tol32


def test_nc_and_anchor_override():
    anchors = [[5, 6, 7, 8], [20, 22, 30, 33], [90, 100, 200, 210]]
    model = DetectionModel(MODELS / "yolov5n.yaml", nc=2, anchors=anchors).eval()
    assert model.yaml["nc"] == 2 and model.detect.na == 2
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64))[0].shape == (1, 2 * (64 + 16 + 4), 7)


def test_activation_override_does_not_leak():
    cfg = yaml.safe_load((MODELS / "yolov5n.yaml").read_text())
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    relu_model = DetectionModel(cfg)
    plain = DetectionModel(MODELS / "yolov5n.yaml")
    assert isinstance(relu_model.model[0].act, torch.nn.LeakyReLU)
    assert relu_model.model[0].act.negative_slope == 0.1
    assert isinstance(relu_model.model[2].m[0].cv1.act, torch.nn.LeakyReLU)
    assert isinstance(plain.model[0].act, torch.nn.SiLU)


def test_tutorial_yaml_splices_backbone(tiny_backbone):
    cfg = yaml.safe_load(TUTORIAL_YAML.format(backbone="TinyBackbone"))
    model = DetectionModel(cfg).eval()
    assert isinstance(model.model[0], tiny_backbone)
    assert [m.index for m in model.model[1:5]] == [0, 1, 2, 3]
    assert all(isinstance(m, FeatureSelect) for m in model.model[1:5])
    assert model.layer_rows[5].module == "SPPF" and model.layer_rows[19].module == "C3"
    assert isinstance(model.model[20], Detect) and len(model.model) == 21
    assert model.detect.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.model[5].cv1.conv.in_channels == 32  # SPPF gets the stride-32 map
    assert model.model[9].cv1.conv.in_channels == 256 + 24  # C3 after concat with index 3 (stride 16)
    assert model.save == [0, 2, 3, 5, 10, 13, 16, 19]
    with torch.no_grad():
        pred, raw = model(torch.zeros(1, 3, 256, 320))
    assert [tuple(r.shape[2:4]) for r in raw] == [(32, 40), (16, 20), (8, 10)]
    assert pred.shape == (1, 3 * (32 * 40 + 16 * 20 + 8 * 10), 85)


def _bad(cfg_text: str) -> str:
    with pytest.raises(ModelConfigError) as info:
        DetectionModel(yaml.safe_load(cfg_text))
    message = str(info.value)
    assert "\n" not in message
    return message


def _yolov5n_text() -> str:
    return (MODELS / "yolov5n.yaml").read_text()


def test_unknown_module_lists_known_names():
    msg = _bad(_yolov5n_text().replace("[-1, 6, C3, [256]]", "[-1, 6, C9, [256]]"))
    assert msg.startswith("layer 4:") and "'C9'" in msg and "C3" in msg and "SPPF" in msg


def test_malicious_module_name_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    name = f"__import__('os').system('touch {marker}')"
    msg = _bad(_yolov5n_text().replace("[-1, 1, SPPF, [1024, 5]]", f'[-1, 1, "{name}", [1024, 5]]'))
    assert msg.startswith("layer 9:") and "unknown module" in msg
    assert not marker.exists()


def test_from_index_out_of_range():
    msg = _bad(_yolov5n_text().replace("[[-1, 6], 1, Concat, [1]]", "[[-1, 60], 1, Concat, [1]]"))
    assert msg.startswith("layer 12:") and "out of range" in msg


def test_concat_of_different_strides():
    msg = _bad(_yolov5n_text().replace("[[-1, 6], 1, Concat, [1]]", "[[-1, 4], 1, Concat, [1]]"))
    assert msg.startswith("layer 12 (Concat)") and "stride" in msg


@pytest.mark.parametrize("key", ["nc", "anchors", "backbone", "head"])
def test_missing_key(key):
    cfg = yaml.safe_load(_yolov5n_text())
    del cfg[key]
    with pytest.raises(ModelConfigError, match=key):
        DetectionModel(cfg)


def test_bad_activation_string_is_not_evaluated():
    cfg = yaml.safe_load(_yolov5n_text())
    cfg["activation"] = "__import__('os').getcwd()"
    with pytest.raises(ModelConfigError, match="activation"):
        DetectionModel(cfg)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        DetectionModel("nope.yaml")


def test_info_summary_line():
    text = DetectionModel(MODELS / "yolov5n.yaml").info(verbose=True, imgsz=320)
    assert "1,872,157 parameters" in text and "GFLOPs" in text
    assert len(text.splitlines()) == 1 + 25 + 1
