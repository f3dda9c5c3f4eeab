"""ComputeLoss, bbox_iou and target assignment on a tiny YOLOv5n model at 64 px."""

from __future__ import annotations

import math

import pytest
import torch

from models.model import DetectionModel
from tests.conftest import EPS16, EPS32
from utils.boxes import bbox_iou
from utils.loss.anchor_based import ComputeLoss, FocalLoss, scale_loss_gains, smooth_bce

HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
# Centres chosen off cell boundaries at every level so each match gets exactly centre + 2 neighbours.
TARGETS = torch.tensor(
    [
        [0, 1, 0.30, 0.40, 0.30, 0.40],
        [1, 0, 0.70, 0.62, 0.20, 0.15],
        [1, 2, 0.40, 0.80, 0.50, 0.30],
    ]
)


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n.yaml", nc=3).train()


def _preds(model: DetectionModel, bs: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return model(torch.rand(bs, 3, 64, 64))


def test_loss_finite_positive_and_backward(model):
    compute = ComputeLoss(model, HYP)
    model.zero_grad()
    loss, items = compute(_preds(model), TARGETS)
    assert loss.ndim == 0 or loss.numel() == 1
    assert torch.isfinite(loss) and loss.item() > 0
    assert items.shape == (3,) and not items.requires_grad
    assert (items > 0).all()
    # scaled by batch size 2; the same three float32 terms summed in another order: a few roundings apart
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=4 * EPS32)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    assert model.model[0].conv.weight.grad is not None  # reaches the first layer


def test_zero_targets_only_objectness(model):
    loss, items = ComputeLoss(model, HYP)(_preds(model), torch.zeros(0, 6))
    box, obj, cls = items.tolist()
    assert box == 0 and cls == 0 and obj > 0
    assert torch.isfinite(loss)


def _perfect_preds(compute: ComputeLoss, shapes: list[torch.Size], targets: torch.Tensor) -> list[torch.Tensor]:
    """Raw outputs that decode exactly to the assigned target boxes, confident obj/class there and nothing elsewhere."""
    preds = [torch.full(s, -12.0) for s in shapes]
    tcls, tbox, indices, anchors = compute.build_targets(preds, targets)
    for i, p in enumerate(preds):
        b, a, gj, gi = indices[i]
        xy = (tbox[i][:, :2] + 0.5) / 2  # inverse of sigmoid*2-0.5
        wh = (tbox[i][:, 2:] / anchors[i]).sqrt() / 2  # inverse of (sigmoid*2)^2*anchor
        p[b, a, gj, gi, 0:2] = torch.logit(xy, eps=1e-6)
        p[b, a, gj, gi, 2:4] = torch.logit(wh, eps=1e-6)
        p[b, a, gj, gi, 4] = 12.0
        p[b, a, gj, gi, 5 + tcls[i]] = 12.0
    return preds


def test_perfect_prediction_beats_random(model):
    compute = ComputeLoss(model, HYP)
    shapes = [p.shape for p in _preds(model)]
    perfect_loss, perfect_items = compute(_perfect_preds(compute, shapes, TARGETS), TARGETS)
    torch.manual_seed(3)
    random_loss, random_items = compute([torch.randn(s) for s in shapes], TARGETS)
    assert perfect_loss.item() < 0.01 * random_loss.item()
    assert perfect_items[0].item() < 1e-3  # CIoU of the exact box is 1
    assert (perfect_items < random_items).all()


def test_bbox_iou_known_values():
    # float32 results of short formulas: a few roundings (EPS32 each) from the exact values; eps=1e-7 in the formula
    # is below half an ulp of these box sizes, so it does not move them
    a = torch.tensor([[10.0, 10.0, 4.0, 4.0]])
    assert bbox_iou(a, a, CIoU=True).item() == pytest.approx(1.0, abs=4 * EPS32)
    assert bbox_iou(a, a).item() == pytest.approx(1.0, abs=4 * EPS32)
    far = torch.tensor([[30.0, 30.0, 4.0, 4.0]])
    assert bbox_iou(a, far).item() == pytest.approx(0.0, abs=4 * EPS32)
    assert bbox_iou(a, far, CIoU=True).item() < 0
    assert bbox_iou(a, far, GIoU=True).item() < 0
    # half-overlapping xyxy boxes: inter 2x4=8, union 16+16-8=24
    b1 = torch.tensor([0.0, 0.0, 4.0, 4.0])
    b2 = torch.tensor([2.0, 0.0, 6.0, 4.0])
    assert bbox_iou(b1, b2, xywh=False).item() == pytest.approx(1 / 3, rel=4 * EPS32)
    # same centres, same aspect: no centre or aspect penalty, so CIoU equals IoU (area 4 vs 16)
    small = torch.tensor([10.0, 10.0, 2.0, 2.0])
    assert bbox_iou(a[0], small, CIoU=True).item() == pytest.approx(0.25, abs=4 * EPS32)
    # DIoU penalty: centres 2 apart, hull 6x4 -> diag^2 52, penalty 4/52
    assert bbox_iou(b1, b2, xywh=False, DIoU=True).item() == pytest.approx(1 / 3 - 4 / 52, rel=8 * EPS32)  # 1/3 - 4/52 cancels ~1.6x


def test_bbox_iou_broadcasts():
    boxes = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) + 1
    out = bbox_iou(boxes[:, None], boxes[None], CIoU=True)
    assert out.shape == (5, 5)
    # a box with itself: h + 1e-7 rounds up one ulp (EPS32 for h in [1, 2)), so 1 - IoU ~ 2 EPS32/h, plus a few roundings
    assert torch.allclose(out.diagonal(), torch.ones(5), rtol=0, atol=16 * EPS32)


def test_build_targets_up_to_three_cells_per_anchor(model):
    compute = ComputeLoss(model, HYP)
    preds = _preds(model)
    tcls, tbox, indices, anchors = compute.build_targets(preds, TARGETS)
    assert len(indices) == model.detect.nl
    for i, p in enumerate(preds):
        b, a, gj, gi = indices[i]
        ny, nx = p.shape[2:4]
        assert (gi >= 0).all() and (gi < nx).all() and (gj >= 0).all() and (gj < ny).all()
        assert (tbox[i][:, :2] >= -0.5).all() and (tbox[i][:, :2] <= 1.5).all()  # reachable by sigmoid*2-0.5
        level_anchors = model.detect.anchors[i]
        for t_i, t in enumerate(TARGETS):
            wh = t[4:6] * torch.tensor([nx, ny])
            ratio = wh / level_anchors
            matching = torch.max(ratio, 1 / ratio).max(1).values < HYP["anchor_t"]
            rows = (b == int(t[0])) & (tcls[i] == int(t[1]))
            for k in range(compute.na):
                cells = {(int(y), int(x)) for y, x in zip(gj[rows & (a == k)], gi[rows & (a == k)])}
                assert len(cells) == (3 if matching[k] else 0), (i, t_i, k)
                if matching[k]:
                    centre = (int(t[3] * ny), int(t[2] * nx))
                    assert centre in cells


def test_build_targets_respects_anchor_threshold(model):
    tight = ComputeLoss(model, {**HYP, "anchor_t": 1.01})
    loose = ComputeLoss(model, HYP)
    preds = _preds(model)
    n_tight = sum(len(ix[0]) for ix in tight.build_targets(preds, TARGETS)[2])
    n_loose = sum(len(ix[0]) for ix in loose.build_targets(preds, TARGETS)[2])
    assert n_tight < n_loose


def test_label_smoothing_changes_cls_targets_and_loss(model):
    assert smooth_bce(0.0) == (1.0, 0.0)
    assert smooth_bce(0.1) == pytest.approx((0.95, 0.05))
    preds = _preds(model)
    plain = ComputeLoss(model, HYP)(preds, TARGETS)[1]
    smooth = ComputeLoss(model, HYP, label_smoothing=0.2)(preds, TARGETS)[1]
    assert smooth[2].item() != pytest.approx(plain[2].item(), rel=1e-3)
    assert smooth[:2].tolist() == pytest.approx(plain[:2].tolist(), rel=4 * EPS32)  # box/obj terms: same float32 computation


def test_focal_loss_used_and_smaller(model):
    focal = ComputeLoss(model, {**HYP, "fl_gamma": 1.5})
    assert isinstance(focal.bce_obj, FocalLoss)
    preds = _preds(model)
    plain_items = ComputeLoss(model, HYP)(preds, TARGETS)[1]
    focal_items = focal(preds, TARGETS)[1]
    assert torch.isfinite(focal_items).all()
    assert focal_items[1] < plain_items[1]  # focal weights every term by <1


def test_gains_scale_components(model):
    preds = _preds(model)
    base = ComputeLoss(model, HYP)(preds, TARGETS)[1]
    doubled = ComputeLoss(model, {**HYP, "box": 0.1, "obj": 2.0, "cls": 1.0})(preds, TARGETS)[1]
    assert torch.allclose(doubled, base * 2, rtol=4 * EPS32, atol=0)  # doubling a gain is exact; the products round once each


def test_scale_loss_gains():
    hyp = {"box": 0.05, "cls": 0.5, "obj": 1.0, "lr0": 0.01}
    out = scale_loss_gains(hyp, nl=3, nc=80, imgsz=640)
    assert out == pytest.approx(hyp)
    out = scale_loss_gains(hyp, nl=4, nc=20, imgsz=320)
    assert out["box"] == pytest.approx(0.05 * 3 / 4)
    assert out["cls"] == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert out["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert hyp["box"] == 0.05  # input untouched


def test_half_precision_inputs_computed_in_float32(model):
    compute = ComputeLoss(model, HYP)
    preds = _preds(model)
    loss32, items32 = compute(preds, TARGETS)
    loss16, items16 = compute([p.half() for p in preds], TARGETS)
    assert loss16.dtype == torch.float32
    # fp16 inputs carry a relative rounding of EPS16/2 each; the smooth losses change by a few of those at most
    assert math.isclose(loss16.item(), loss32.item(), rel_tol=10 * EPS16)
