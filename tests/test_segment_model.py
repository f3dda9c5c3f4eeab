"""YOLOv5's segmentation head: Segment/Proto construction from yaml, output layouts, and mask assembly from prototypes."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from torch import nn

from models.heads.base import head_class
from models.heads.detect import Detect
from models.heads.segment import Proto, Segment, crop_to_boxes, masks_from_protos
from models.model import DetectionModel, load_model_config
from models.parse import ModelConfigError
from models.registry import get_module

NM = 32


@cache
def _model(cfg: str, nc: int | None = None) -> DetectionModel:
    """One built model per (config, nc), shared by the tests that only read it."""
    torch.manual_seed(0)
    return DetectionModel(cfg, nc=nc)


def _eval_out(model: DetectionModel, x: torch.Tensor) -> tuple:
    """The eval-mode, no-grad output (training mode restored afterwards)."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(mode)
    return out


@pytest.mark.parametrize("cfg, expected", [("yolov5n-seg.yaml", 1_991_549), ("yolov5s-seg.yaml", 7_621_277)])
def test_parameter_parity_with_yolov5(cfg: str, expected: int) -> None:
    # Source: YOLOv5 v7.0 published yolov5n-seg / yolov5s-seg (nc=80) parameter counts.
    assert sum(p.numel() for p in _model(cfg, 80).parameters()) == expected


def test_proto_width_scales_with_width_multiple() -> None:
    head = _model("yolov5n-seg.yaml", 80).head
    assert isinstance(head, Segment) and isinstance(head.proto, Proto)
    assert head.npr == 64 and head.proto.cv1.conv.out_channels == 64  # make_divisible(256 * 0.25, 8)
    assert head.proto.cv3.conv.out_channels == NM and head.nm == NM and head.no == 5 + 80 + NM
    assert _model("yolov5s-seg.yaml", 80).head.proto.cv1.conv.out_channels == 128


def test_registered_as_segment_head() -> None:
    assert head_class("segment") is Segment and issubclass(Segment, Detect)
    assert get_module("Segment").cls is Segment and get_module("Segment").kind == "segment"
    model = _model("yolov5n-seg.yaml", 80)
    assert model.head_kind == "segment" and model.task == "segment"
    assert _model("yolov5n.yaml", 80).task == "detect"
    assert Segment.export_layout == "(batch, anchors, 5 + nc + nm)"


def test_training_and_eval_output_shapes() -> None:
    nc = 3
    model = _model("yolov5n-seg.yaml", nc)
    x = torch.rand(1, 3, 64, 96)
    model.train()
    raw, protos = model(x)
    assert protos.shape == (1, NM, 16, 24)
    assert [tuple(r.shape) for r in raw] == [(1, 3, 8, 12, 5 + nc + NM), (1, 3, 4, 6, 5 + nc + NM), (1, 3, 2, 3, 5 + nc + NM)]
    decoded, protos_eval, raw_eval = _eval_out(model, x)
    n = 3 * (8 * 12 + 4 * 6 + 2 * 3)
    assert decoded.shape == (1, n, 5 + nc + NM) and protos_eval.shape == (1, NM, 16, 24) and len(raw_eval) == 3


def test_scores_sigmoided_coefficients_raw() -> None:
    nc = 3
    model = _model("yolov5n-seg.yaml", nc)
    decoded, _, raw = _eval_out(model, torch.rand(1, 3, 64, 96))
    scores, coeffs = decoded[..., 4 : 5 + nc], decoded[..., 5 + nc :]
    assert scores.min() >= 0 and scores.max() <= 1
    assert coeffs.min() < 0  # sigmoided values could never be negative
    level0 = raw[0].reshape(1, -1, 5 + nc + NM)
    torch.testing.assert_close(decoded[:, : level0.shape[1], 5 + nc :], level0[..., 5 + nc :])
    torch.testing.assert_close(decoded[:, : level0.shape[1], 4 : 5 + nc], level0[..., 4 : 5 + nc].sigmoid())
    boxes, cls_scores, extras = Segment.split_output(decoded, nm=NM)
    assert boxes.shape == (1, decoded.shape[1], 4) and cls_scores.shape[-1] == nc
    torch.testing.assert_close(extras, coeffs)


def test_detect_part_matches_a_plain_detect_head() -> None:
    torch.manual_seed(0)
    seg = Segment(2, [[10, 13, 16, 30, 33, 23]], NM, 16, [8], [8.0]).eval()
    det = Detect(2, [[10, 13, 16, 30, 33, 23]], [8], [8.0]).eval()
    with torch.no_grad():  # copy the shared box/objectness/class channels of the 1x1 conv into the Detect head
        w = seg.m[0].weight.view(3, 5 + 2 + NM, 8)[:, : 5 + 2].reshape(-1, 8, 1, 1)
        b = seg.m[0].bias.view(3, 5 + 2 + NM)[:, : 5 + 2].reshape(-1)
        det.m[0].weight.copy_(w)
        det.m[0].bias.copy_(b)
        x = [torch.randn(1, 8, 4, 5)]
        torch.testing.assert_close(seg(x)[0][..., : 5 + 2], det(x)[0])


def test_bias_priors_only_on_objectness_and_classes() -> None:
    nc = 2
    torch.manual_seed(1)
    seg = Segment(nc, [[10, 13, 16, 30, 33, 23]], NM, 16, [8], [8.0])
    torch.manual_seed(1)
    plain = nn.Conv2d(8, 3 * (5 + nc + NM), 1)  # the same draws, without the priors
    shift = (seg.m[0].bias - plain.bias).detach().view(3, 5 + nc + NM)
    torch.testing.assert_close(shift[:, 4], torch.full((3,), math.log(8 / (640 / 8) ** 2)))
    torch.testing.assert_close(shift[:, 5 : 5 + nc], torch.full((3, nc), math.log(0.6 / (nc - 0.99))))
    assert torch.all(shift[:, :4] == 0) and torch.all(shift[:, 5 + nc :] == 0)  # boxes and mask coefficients untouched


@pytest.mark.parametrize("cfg", ["yolov5_mobilenetv4-seg.yaml", "yolov5n_mobileone_s0-seg.yaml"])
def test_mobile_seg_configs_build_and_run(cfg: str) -> None:
    model = _model(cfg)
    assert model.task == "segment" and model.yaml["head"][-1][2] == "Segment"
    decoded, protos, _ = _eval_out(model, torch.rand(1, 3, 64, 64))
    assert decoded.shape[-1] == 5 + model.yaml["nc"] + NM and protos.shape == (1, NM, 16, 16)


def test_tutorial_seg_row_is_the_yolov5_one() -> None:
    row = load_model_config("yolov5_mobilenetv4-seg.yaml")["head"][-1]
    assert row == [[13, 16, 19], 1, "Segment", ["nc", "anchors", 32, 256]]


def test_tta_refused() -> None:
    with pytest.raises(ValueError, match="TTA is not supported for segmentation models"):
        _model("yolov5n-seg.yaml", 80).eval()(torch.rand(1, 3, 64, 64), augment=True)


def test_segment_row_validation() -> None:
    cfg = load_model_config("yolov5n-seg.yaml")
    cfg["head"][-1][3] = ["nc", "anchors", 0, 256]
    with pytest.raises(ModelConfigError, match=r"\(Segment\): takes \[nc, anchors, nm, npr\]"):
        DetectionModel(cfg)
    cfg["head"][-1][3] = ["nc", [[10, 13, 16, 30, 33, 23]], 32, 256]
    with pytest.raises(ModelConfigError, match=r"\(Segment\): 1 anchor levels for 3 inputs"):
        DetectionModel(cfg)


def test_masks_from_protos_hand_made_case() -> None:
    protos = torch.zeros(2, 8, 8)
    protos[0, 2:6, 2:6] = 1.0  # prototype 0 lights a 4x4 square; prototype 1 is empty
    coeffs = torch.tensor([[20.0, 0.0]])
    box = torch.tensor([[8.0, 8.0, 24.0, 20.0]])  # input pixels on a 32x32 image = proto cells x 2..6, y 2..5
    masks = masks_from_protos(protos, coeffs, box, (32, 32))
    assert masks.shape == (1, 8, 8) and masks.dtype == torch.float32
    assert masks[0, 2:5, 2:6].min() > 0.99  # inside the box and the square: ~1
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:5, 2:6] = False
    assert torch.all(masks[0][outside] == 0)  # exactly 0 outside the box (row 5 of the square is cropped away)
    up = masks_from_protos(protos, coeffs, box, (32, 32), upsample=True)
    assert up.shape == (1, 32, 32) and up.min() >= 0 and up.max() <= 1
    assert up[0, 12, 12] > 0.99 and up[0, 0, 0] == 0


def test_masks_from_protos_non_square_and_empty() -> None:
    protos = torch.randn(4, 6, 10)
    masks = masks_from_protos(protos, torch.randn(3, 4), torch.tensor([[0.0, 0.0, 40.0, 24.0]] * 3), (24, 40))
    assert masks.shape == (3, 6, 10) and masks.min() > 0  # a whole-image box keeps every pixel
    assert masks_from_protos(protos, torch.zeros(0, 4), torch.zeros(0, 4), (24, 40), upsample=True).shape == (0, 24, 40)


def test_crop_to_boxes() -> None:
    masks = torch.ones(2, 4, 5)
    out = crop_to_boxes(masks, torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 5.0, 4.0]]))
    expected = torch.zeros(4, 5)
    expected[0:2, 1:3] = 1
    assert torch.equal(out[0], expected) and torch.equal(out[1], torch.ones(4, 5))
