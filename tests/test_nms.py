"""Tests for utils.nms.non_max_suppression on hand-built predictions."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EPS16
from utils.nms import non_max_suppression


def row(cx, cy, w, h, obj, cls_scores):
    """One prediction row: xywh pixels, objectness, per-class scores."""
    return [cx, cy, w, h, obj, *cls_scores]


def batch(*rows) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float32)


def test_overlapping_same_class_suppressed():
    p = batch(row(50, 50, 20, 20, 0.9, [0.9, 0.1]), row(52, 50, 20, 20, 0.8, [0.9, 0.1]), row(10, 10, 8, 8, 0.7, [0.9, 0.1]))
    (out,) = non_max_suppression(p, conf_thres=0.25, iou_thres=0.45)
    assert out.shape == (2, 6)
    # best box kept, xyxy conversion and conf = obj * cls
    torch.testing.assert_close(out[0], torch.tensor([40.0, 40.0, 60.0, 60.0, 0.81, 0.0]))
    torch.testing.assert_close(out[1, :4], torch.tensor([6.0, 6.0, 14.0, 14.0]))


def test_overlapping_different_classes_kept_unless_agnostic():
    p = batch(row(50, 50, 20, 20, 0.9, [0.9, 0.1]), row(51, 50, 20, 20, 0.9, [0.1, 0.8]))
    (out,) = non_max_suppression(p, 0.25, 0.45)
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0]
    (out_ag,) = non_max_suppression(p, 0.25, 0.45, agnostic=True)
    assert out_ag.shape[0] == 1 and out_ag[0, 5] == 0


def test_iou_threshold_controls_suppression():
    # IoU of these two boxes is 16/24 = 0.667
    p = batch(row(50, 50, 20, 20, 0.9, [1.0]), row(54, 50, 20, 20, 0.8, [1.0]))
    assert non_max_suppression(p, 0.25, iou_thres=0.6)[0].shape[0] == 1
    assert non_max_suppression(p, 0.25, iou_thres=0.7)[0].shape[0] == 2


def test_classes_filter_and_conf_threshold():
    p = batch(row(20, 20, 10, 10, 0.9, [0.9, 0.0, 0.0]), row(60, 60, 10, 10, 0.9, [0.0, 0.9, 0.0]),
              row(90, 90, 10, 10, 0.9, [0.0, 0.0, 0.3]), row(90, 20, 10, 10, 0.2, [0.0, 0.0, 1.0]))
    (out,) = non_max_suppression(p, conf_thres=0.25)
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0, 2.0]  # 0.9 * 0.3 = 0.27 passes; objectness 0.2 fails
    (out,) = non_max_suppression(p, conf_thres=0.3)
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0]
    (out,) = non_max_suppression(p, conf_thres=0.25, classes=[1, 2])
    assert sorted(out[:, 5].tolist()) == [1.0, 2.0]


def test_conf_is_product_of_obj_and_cls():
    p = batch(row(20, 20, 10, 10, 0.5, [0.6]), row(60, 60, 10, 10, 0.5, [0.4]))
    (out,) = non_max_suppression(p, conf_thres=0.25)
    assert out.shape[0] == 1
    assert out[0, 4].item() == pytest.approx(0.3)


def test_max_det_keeps_highest_scores():
    rows = [row(10 + 20 * i, 10, 8, 8, 0.3 + 0.05 * i, [1.0]) for i in range(10)]
    (out,) = non_max_suppression(batch(*rows), conf_thres=0.1, max_det=3)
    assert out.shape[0] == 3
    assert torch.all(out[:-1, 4] >= out[1:, 4])
    assert out[0, 4].item() == pytest.approx(0.75)


def test_multi_label_one_row_per_class_above_threshold():
    p = batch(row(50, 50, 20, 20, 1.0, [0.8, 0.6, 0.1]))
    (single,) = non_max_suppression(p, 0.25)
    (multi,) = non_max_suppression(p, 0.25, multi_label=True)
    assert single.shape[0] == 1 and single[0, 5] == 0
    assert multi.shape[0] == 2
    assert sorted(multi[:, 5].tolist()) == [0.0, 1.0]
    torch.testing.assert_close(multi[:, 4].sort(descending=True).values, torch.tensor([0.8, 0.6]))


def test_empty_and_all_below_threshold():
    empty = torch.zeros((2, 0, 7))
    out = non_max_suppression(empty)
    assert len(out) == 2 and all(o.shape == (0, 6) for o in out)
    low = batch(row(50, 50, 20, 20, 0.1, [1.0, 1.0]))
    assert non_max_suppression(low, 0.25)[0].shape == (0, 6)


def test_batch_of_two_and_tuple_input():
    a = [row(50, 50, 20, 20, 0.9, [1.0, 0.0]), row(51, 50, 20, 20, 0.8, [1.0, 0.0])]
    b = [row(30, 30, 10, 10, 0.9, [0.0, 1.0]), row(80, 80, 10, 10, 0.9, [0.0, 1.0])]
    p = torch.tensor([a, b])
    out = non_max_suppression((p, ["raw outputs ignored"]))
    assert [o.shape[0] for o in out] == [1, 2]
    assert out[1][:, 5].tolist() == [1.0, 1.0]


def test_fp16_input():
    p = batch(row(50, 50, 20, 20, 0.9, [0.9, 0.1]), row(52, 50, 20, 20, 0.8, [0.9, 0.1]), row(200, 200, 30, 30, 0.7, [0.1, 0.9]))
    out16 = non_max_suppression(p.half())[0]
    out32 = non_max_suppression(p)[0]
    assert out16.dtype == torch.float16
    assert out16.shape == out32.shape == (2, 6)
    # fp16: the inputs and the xywh -> xyxy / score products round once each (EPS16/2 relative): two roundings apart
    torch.testing.assert_close(out16.float(), out32, rtol=2 * EPS16, atol=0)


def test_random_output_obeys_invariants():
    torch.manual_seed(0)
    n, nc = 500, 4
    xy = torch.rand(1, n, 2) * 128
    wh = torch.rand(1, n, 2) * 40 + 4
    p = torch.cat((xy, wh, torch.rand(1, n, 1 + nc)), -1)
    (out,) = non_max_suppression(p, conf_thres=0.2, iou_thres=0.5, max_det=50)
    assert 0 < out.shape[0] <= 50
    assert (out[:, 4] > 0.2).all()
    assert torch.all(out[:-1, 4] >= out[1:, 4])
    from torchvision.ops import box_iou

    for c in out[:, 5].unique():
        boxes = out[out[:, 5] == c, :4]
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou <= 0.5 + 1e-6).all()


@pytest.mark.parametrize("kwargs", [{"conf_thres": 1.5}, {"conf_thres": -0.1}, {"iou_thres": 2.0}, {"max_det": 0}])
def test_invalid_args(kwargs):
    with pytest.raises(ValueError):
        non_max_suppression(torch.zeros(1, 1, 6), **kwargs)


def test_bad_shape_rejected():
    with pytest.raises(ValueError, match="3-d tensor"):
        non_max_suppression(torch.zeros(10, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(1)
    p = torch.cat((torch.rand(2, 300, 2) * 128, torch.rand(2, 300, 2) * 30 + 4, torch.rand(2, 300, 3)), -1)
    cpu = non_max_suppression(p)
    gpu = non_max_suppression(p.cuda().half())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        assert abs(a.shape[0] - b.shape[0]) <= 2
