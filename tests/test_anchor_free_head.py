"""YOLOv8-style anchor-free head, C2f, yaml scales and the shipped anchor-free configs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from models.blocks.yolo import Bottleneck, C2f
from models.heads.anchor_free import DFL, AnchorFreeDetect
from models.heads.anchor_points import bbox2dist, dist2bbox, make_anchors
from models.heads.detect import Detect
from models.mobileone import MobileOneUnit
from models.model import DetectionModel
from models.parse import ModelConfigError
from tests.conftest import EPS32, calibrate_bn, random_images, rel_err, rounding_tol

MODELS = Path(__file__).resolve().parents[1] / "models"
ANCHOR_FREE_CONFIGS = sorted(p.name for p in MODELS.glob("yolov8*.yaml"))
PUBLISHED = {"yolov8n.yaml": 3_157_200, "yolov8s.yaml": 11_166_560}  # nc=80, with the frozen DFL conv's 16 weights


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _yolov8n() -> dict:
    return yaml.safe_load((MODELS / "yolov8n.yaml").read_text())


def _bad(cfg: dict) -> str:
    with pytest.raises(ModelConfigError) as info:
        DetectionModel(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------- configs


def test_shipped_configs() -> None:
    mobile = {f"yolov8s_mobilenetv4_{v}.yaml" for v in ("conv_small", "conv_medium", "hybrid_medium")}
    mobile |= {"yolov8s_mobileone_s0.yaml", "yolov8s_mobileone_s1.yaml", "yolov8n_mobilenetv4_conv_small.yaml", "yolov8n_mobileone_s0.yaml"}
    assert mobile | set(PUBLISHED) <= set(ANCHOR_FREE_CONFIGS)
    assert all("anchors" not in yaml.safe_load((MODELS / c).read_text()) for c in ANCHOR_FREE_CONFIGS)


@pytest.mark.parametrize("cfg", sorted(PUBLISHED))
def test_published_parameter_counts(cfg: str) -> None:
    model = DetectionModel(MODELS / cfg)
    assert model.yaml["scale"] == cfg[6] and isinstance(model.head, AnchorFreeDetect)
    assert n_params(model) == PUBLISHED[cfg]
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 16  # only the DFL expectation weights


@pytest.mark.parametrize("cfg", ANCHOR_FREE_CONFIGS)
def test_config_builds_and_output_shapes(cfg: str) -> None:
    model = DetectionModel(MODELS / cfg, nc=4)
    head = model.head
    assert model.head_kind == "anchor_free" and model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.layer_rows[-1].module == "AnchorFreeDetect" and head.no == 4 * 16 + 4
    if "_mobile" in cfg:
        assert model.layer_rows[5].index == 5 and model.routes[-1] == [11, 14, 17] and model.yaml["scale"] == cfg[6]  # yolov8<s>
    x = torch.zeros(2, 3, 64, 96)
    raw = model.train()(x)
    assert [tuple(r.shape) for r in raw] == [(2, 68, 64 // s, 96 // s) for s in (8, 16, 32)]
    with torch.no_grad():
        pred, raw_eval = model.eval()(x)
    assert pred.shape == (2, 4 + 4, 8 * 12 + 4 * 6 + 2 * 3) and len(raw_eval) == 3
    assert pred[:, 4:].min() >= 0 and pred[:, 4:].max() <= 1


@pytest.mark.parametrize("cfg", ANCHOR_FREE_CONFIGS)
def test_fuse_parity(cfg: str) -> None:
    model = calibrate_bn(DetectionModel(MODELS / cfg, nc=4), (2, 3, 128, 128), steps=2, normalise=False)
    x = random_images((1, 3, 128, 96), seed=100, normalise=False)
    with torch.no_grad():
        before = model(x)[1]
        model.fuse()
        after = model(x)[1]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not n.endswith(".norm") for n, m in model.named_modules())
    assert not any(isinstance(m, MobileOneUnit) and not m.is_fused for m in model.modules())
    tol = rounding_tol(model)
    assert all(rel_err(a, b) < tol for a, b in zip(after, before))


def test_mobileone_block_rows_reparameterise() -> None:
    model = DetectionModel(MODELS / "yolov8s_mobileone_s0.yaml", nc=4)
    rows = [i for i, r in enumerate(model.layer_rows) if r.module == "MobileOneBlock"]
    assert rows == [12, 15]
    block = model.model[12]
    assert isinstance(block, MobileOneUnit) and len(block.convs) == 4 and block.stride == 2
    assert block.in_channels == block.out_channels == 128  # [256, 3, 2, 1, 4] at width 0.5
    model.fuse()
    assert all(model.model[i].is_fused and len(model.model[i].convs) == 0 for i in rows)


# ----------------------------------------------------------------------------------------------------- head


def test_head_widths_and_bias_init() -> None:
    head = DetectionModel(MODELS / "yolov8n.yaml").head
    assert isinstance(head, AnchorFreeDetect) and head.reg_max == 16 and head.nc == 80
    assert head.cv2[0][0].conv.out_channels == max(16, 64 // 4, 64)  # ch[0] = 64 at the n scale
    assert head.cv3[0][0].conv.out_channels == max(64, min(80, 100))
    for i, s in enumerate((8, 16, 32)):
        assert torch.equal(head.cv2[i][-1].bias, torch.full((64,), 2.0))
        assert torch.equal(head.cv3[i][-1].bias, torch.full((80,), math.log(5 / 80 / (640 / s) ** 2)))


def test_dfl_is_frozen_expectation() -> None:
    dfl = DFL(16)
    assert not dfl.conv.weight.requires_grad and dfl.conv.weight.flatten().tolist() == list(range(16))
    logits = torch.full((1, 4 * 16, 3), -1e4)
    for side, k in enumerate((0, 5, 15, 9)):
        logits[0, side * 16 + k] = 0.0  # all the mass on bin k for this side
    assert torch.equal(dfl(logits), torch.tensor([[0.0, 5.0, 15.0, 9.0]]).T.expand(4, 3).unsqueeze(0))


def test_dfl_round_trip_with_bbox2dist() -> None:
    points = torch.tensor([[3.5, 4.5], [10.5, 0.5]])
    boxes = torch.tensor([[1.0, 0.25, 9.0, 12.0], [4.2, 0.0, 11.0, 3.3]])
    dist = bbox2dist(points, boxes, 16 - 1 - 0.01)  # (N, 4), fractional distances inside the bin range
    low = dist.floor().long()
    frac = dist - low
    probs = torch.zeros(2, 4, 16)
    probs.scatter_(2, low.unsqueeze(2), (1 - frac).unsqueeze(2))
    probs.scatter_add_(2, (low + 1).unsqueeze(2), frac.unsqueeze(2))
    logits = probs.log().reshape(2, 64).T.unsqueeze(0)  # (1, 4 * 16, N); log(0) = -inf carries no mass
    decoded = DFL(16)(logits)[0].T
    tol = 16 * 16 * EPS32  # softmax and a 16-term sum of values up to 15, each rounding at eps
    assert torch.allclose(decoded, dist, rtol=0, atol=tol)
    assert torch.allclose(dist2bbox(decoded, points, xywh=False), boxes, rtol=0, atol=2 * tol)


def test_make_anchors_on_a_2x3_map() -> None:
    points, strides = make_anchors([torch.zeros(1, 5, 2, 3)], [8.0])
    assert points.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5]]
    assert strides.tolist() == [[8.0]] * 6


def test_decode_by_hand() -> None:
    head = AnchorFreeDetect(nc=2, ch=(8,), strides=(16,)).eval()
    raw = torch.full((1, 4 * 16 + 2, 1, 2), -1e4)
    for side, k in enumerate((1, 2, 3, 4)):  # distances left 1, top 2, right 3, bottom 4 for both cells
        raw[0, side * 16 + k] = 0.0
    raw[0, 64:, 0] = torch.tensor([[0.0, 0.0], [2.0, -2.0]])  # (class, cell)
    pred = head.decode([raw])
    # cell (0, 0): point (0.5, 0.5) -> x1y1 (-0.5, -1.5), x2y2 (3.5, 4.5); cell (1, 0) is one stride to the right
    expected_boxes = torch.tensor([[1.5, 2.5], [1.5, 1.5], [4.0, 4.0], [6.0, 6.0]]) * 16
    assert torch.equal(pred[0, :4], expected_boxes)
    assert torch.equal(pred[0, 4:], torch.tensor([[0.0, 0.0], [2.0, -2.0]]).sigmoid())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # torch.jit.trace and the TorchScript exporter
def test_export_with_dynamic_sizes_and_tracing(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = DetectionModel(MODELS / "yolov8n.yaml", nc=3).eval().fuse()

    class FirstOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)[0]

    wrapper = FirstOutput().eval()
    path = tmp_path / "m.onnx"
    axes = {"images": {0: "b", 2: "h", 3: "w"}, "output0": {0: "b", 2: "n"}}
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, torch.rand(1, 3, 64, 96))
        torch.onnx.export(wrapper, (torch.rand(1, 3, 64, 96),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes)  # fmt: skip
    session = ort.InferenceSession(str(path))
    tol = rounding_tol(model)
    for shape in ((1, 3, 64, 96), (2, 3, 128, 64)):
        x = random_images(shape, seed=1, normalise=False)
        with torch.no_grad():
            ref = wrapper(x)
            assert rel_err(traced(x), ref) < tol
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == ref.shape == (shape[0], 7, sum((shape[2] // s) * (shape[3] // s) for s in (8, 16, 32)))
        assert rel_err(got, ref) < tol


# ----------------------------------------------------------------------------------------------------- blocks and yaml


def test_c2f_parameter_count_by_hand() -> None:
    def conv(ci: int, co: int, k: int) -> int:  # Conv2d without bias + BN weight and bias
        return ci * co * k * k + 2 * co

    block = C2f(8, 16, n=2, shortcut=True)
    c = 8  # int(16 * 0.5)
    assert n_params(block) == conv(8, 2 * c, 1) + 2 * (2 * conv(c, c, 3)) + conv((2 + 2) * c, 16, 1)
    assert block.m[0].add and block(torch.zeros(1, 8, 5, 7)).shape == (1, 16, 5, 7)
    assert not C2f(8, 16, n=1).m[0].add  # no shortcut by default (the neck's C2f rows)


def test_bottleneck_default_kernels_unchanged() -> None:
    plain = Bottleneck(8, 8)
    assert plain.cv1.conv.kernel_size == (1, 1) and plain.cv2.conv.kernel_size == (3, 3)
    assert Bottleneck(8, 8, k=(3, 3)).cv1.conv.kernel_size == (3, 3)
    assert set(plain.state_dict()) == set(Bottleneck(8, 8, k=(3, 3)).state_dict())


def test_scale_from_key_overrides_file_name() -> None:
    cfg = _yolov8n()
    cfg.update(yaml_file="yolov8n.yaml", scale="s")
    assert n_params(DetectionModel(cfg)) == PUBLISHED["yolov8s.yaml"]


def test_scale_max_channels_caps_widths() -> None:
    cfg = _yolov8n()
    cfg.update(scale="t", scales={"t": [0.33, 0.5, 256]})
    model = DetectionModel(cfg)
    assert model.model[7].conv.out_channels == 128  # min(1024, 256) * 0.5
    assert model.model[3].conv.out_channels == 128  # min(256, 256) * 0.5


def test_scale_letter_of_a_renamed_mobile_config(tmp_path: Path) -> None:
    path = tmp_path / "exp_yolov8n_mobileone_s0.yaml"
    path.write_text((MODELS / "yolov8s_mobileone_s0.yaml").read_text())
    model = DetectionModel(path)
    assert model.yaml["scale"] == "n" and model.model[12].out_channels == 64  # MobileOneBlock [256, ...] at width 0.25


def test_no_scale_given_uses_first_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = _yolov8n()  # a dict: no yaml_file key, no scale key
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        model = DetectionModel(cfg)
    assert model.yaml["scale"] == "n" and n_params(model) == PUBLISHED["yolov8n.yaml"]
    assert "using the first, 'n'" in caplog.text


def test_unknown_scale_letter(tmp_path: Path) -> None:
    path = tmp_path / "yolov8q.yaml"
    path.write_text((MODELS / "yolov8n.yaml").read_text())
    with pytest.raises(ModelConfigError, match=r"scale 'q' \(from the file name yolov8q.yaml\) is not in scales; known: n, s, m, l, x"):
        DetectionModel(path)
    cfg = _yolov8n()
    cfg["scale"] = "z"
    assert "scale 'z' (from the scale key)" in _bad(cfg)


@pytest.mark.parametrize("entry", [[0.33, 0.25], [0.33, "wide", 1024], [0.33, -0.25, 1024], 0.5])
def test_bad_scales_entry(entry: object) -> None:
    cfg = _yolov8n()
    cfg.update(scale="n", scales={"n": entry})
    assert "scales['n'] must be 3 positive numbers" in _bad(cfg)


def test_scales_and_multiples_conflict() -> None:
    cfg = _yolov8n()
    cfg["width_multiple"] = 0.5
    assert "either scales or depth_multiple/width_multiple" in _bad(cfg)


def test_anchors_key_selects_the_anchor_based_head() -> None:
    cfg = yaml.safe_load((MODELS / "yolov8n.yaml").read_text())
    cfg["anchors"] = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    model = DetectionModel(cfg)
    assert type(model.head) is Detect and model.head_kind == "anchor_based"


@pytest.mark.parametrize(
    "args, needle",
    [("[nc, anchors]", "argument 'anchors' but the config has no anchors key"), ("[nc, 16]", "takes [nc]"), ("[0]", "takes [nc]"),
     ("['x']", "takes [nc]")],
)  # fmt: skip
def test_bad_anchor_free_detect_rows(args: str, needle: str) -> None:
    cfg = yaml.safe_load((MODELS / "yolov8n.yaml").read_text().replace("Detect, [nc]]", f"Detect, {args}]"))
    msg = _bad(cfg)
    assert msg.startswith("layer 22 (") and needle in msg


def test_info_cli_prints_summary(caplog: pytest.LogCaptureFixture) -> None:
    from models.info import main

    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        main(["--cfg", str(MODELS / "yolov8n.yaml"), "--imgsz", "64", "--verbose"])
    assert "yolov8n summary:" in caplog.text and "3,157,200 parameters, 3,157,184 gradients" in caplog.text
    assert "AnchorFreeDetect" in caplog.text and "C2f" in caplog.text


def test_test_time_augmentation_keeps_the_anchor_free_layout() -> None:
    """TTA merges 3 passes in (B, 4 + nc, N) layout, dropping the full-size P5 and the smallest pass's P3 rows."""
    from models.model import DetectionModel

    model = DetectionModel("models/yolov8n.yaml", nc=3).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        plain = model(x)[0]
        aug, _ = model(x, augment=True)
    sizes = [(96, 96), (96, 96), (64, 64)]  # 96*0.83 = 79 -> padded to 96; 96*0.67 = 64
    counts = [sum((h // s) * (w // s) for s in (8, 16, 32)) for h, w in sizes]
    p5_full, p3_small = (96 // 32) ** 2, (64 // 8) ** 2
    assert plain.shape == (1, 7, counts[0])
    assert aug.shape == (1, 7, sum(counts) - p5_full - p3_small)
    assert torch.equal(aug[:, :, : counts[0] - p5_full], plain[:, :, : counts[0] - p5_full])  # the unscaled pass comes first
