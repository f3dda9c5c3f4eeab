"""SegmentLoss (YOLOv5-seg's loss) on hand-made head outputs: the mask term against a hand computation, both mask
encodings, agreement of the box/obj/cls terms with ComputeLoss, gradients, and the build_loss registration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.heads.segment import crop_to_boxes
from models.model import DetectionModel
from utils.loss import build_loss
from utils.loss.anchor_based import ComputeLoss
from utils.loss.segment import SegmentLoss, rank_within_image

HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
NC, NM = 2, 2
GRID, PROTO = 8, 16  # one 8x8 level, 16x16 prototypes


class _Head(nn.Module):
    """Just what the anchor-based loss reads from a head: anchors (grid units), na, nc, nl and the kind."""

    kind = "segment"

    def __init__(self, anchors: torch.Tensor, nc: int) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors)
        self.nl, self.na, self.nc = anchors.shape[0], anchors.shape[1], nc


class _Model(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.detect = head


def one_level_model() -> _Model:
    """One level, one 2x2-cell anchor: a 0.25 x 0.25 target centred on a cell centre gets exactly one positive."""
    return _Model(_Head(torch.tensor([[[2.0, 2.0]]]), NC))


# centre (3.5, 3.5) in grid cells: no neighbour cell is added, the one positive is cell (3, 3) of anchor 0
ONE_TARGET = torch.tensor([[0.0, 1.0, 3.5 / GRID, 3.5 / GRID, 0.25, 0.25]])
BOX_PX = (5, 9)  # in 16x16 prototype pixels the target box spans columns/rows 5..8


def one_gt_mask() -> torch.Tensor:
    """(16, 16) binary ground truth: the left half of the box plus a pixel outside it (which the crop must ignore)."""
    m = torch.zeros(PROTO, PROTO)
    m[5:9, 5:7] = 1
    m[0, 0] = 1
    return m


def head_output(coef: tuple[float, ...], bs: int = 1) -> list[torch.Tensor]:
    """A (bs, 1, 8, 8, 5 + nc + nm) output whose positive cell (3, 3) carries mask coefficients `coef`."""
    p = torch.zeros(bs, 1, GRID, GRID, 5 + NC + NM)
    p[0, 0, 3, 3, -NM:] = torch.tensor(coef)
    return [p]


def bce(x: float, y: float) -> float:
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def test_rank_within_image_counts_rows_per_image_in_order() -> None:
    assert rank_within_image(torch.tensor([1, 0, 1, 1, 0, 3])).tolist() == [0, 0, 1, 2, 1, 0]
    assert rank_within_image(torch.zeros(0)).tolist() == []


def test_crop_keeps_pixels_inside_half_open_boxes() -> None:
    out = crop_to_boxes(torch.ones(2, 4, 5), torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.5, 1.5, 5.0, 4.0]]))
    assert out[0].nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert out[1].sum() == 2 * 4  # columns 1..4 (x >= 0.5), rows 2..3 (y >= 1.5)


def test_assignment_of_the_hand_made_case_is_one_centre_cell() -> None:
    rows = ComputeLoss(one_level_model(), HYP).assign_targets(head_output((0.0, 0.0)), ONE_TARGET)
    b, a, gj, gi = rows.indices[0]
    assert (b.tolist(), a.tolist(), gj.tolist(), gi.tolist(), rows.rows[0].tolist()) == ([0], [0], [3], [3], [0])


def test_zero_coefficients_give_log2_times_box_gain() -> None:
    # logits 0 -> BCE log 2 at each of the 16 box pixels; mean over 256 pixels / area 0.0625 = log 2; times box gain / bs
    loss = SegmentLoss(one_level_model(), HYP)
    _, items = loss((head_output((0.0, 0.0)), torch.randn(1, NM, PROTO, PROTO)), ONE_TARGET, one_gt_mask()[None])
    assert items.shape == (4,) and SegmentLoss.names[1] == "seg_loss"
    assert items[1].item() == pytest.approx(math.log(2) * HYP["box"], rel=1e-6)


def test_seg_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    protos = torch.randn(1, NM, PROTO, PROTO)
    coef = (0.7, -1.3)
    logits = (coef[0] * protos[0, 0] + coef[1] * protos[0, 1]).tolist()
    gt = one_gt_mask().tolist()
    lo, hi = BOX_PX
    total = sum(bce(logits[y][x], gt[y][x]) for y in range(lo, hi) for x in range(lo, hi))
    expected = total / PROTO**2 / (0.25 * 0.25) * HYP["box"] / 1
    loss = SegmentLoss(one_level_model(), HYP)
    _, items = loss((head_output(coef), protos), ONE_TARGET, one_gt_mask()[None])
    assert items[1].item() == pytest.approx(expected, rel=1e-5)
    # a ground truth at twice the prototype resolution is resized nearest: the same loss
    big = one_gt_mask().repeat_interleave(2, 0).repeat_interleave(2, 1)
    _, items_big = loss((head_output(coef), protos), ONE_TARGET, big[None])
    assert items_big[1].item() == pytest.approx(items[1].item(), rel=1e-6)


def test_perfect_coefficients_beat_zero_coefficients() -> None:
    gt = one_gt_mask()
    protos = torch.stack((10 * (2 * gt - 1), torch.randn(PROTO, PROTO)))[None]
    loss = SegmentLoss(one_level_model(), HYP)
    _, perfect = loss((head_output((1.0, 0.0)), protos), ONE_TARGET, gt[None])
    _, zero = loss((head_output((0.0, 0.0)), protos), ONE_TARGET, gt[None])
    assert perfect[1] < 1e-3 * zero[1]
    assert torch.equal(perfect[[0, 2, 3]], zero[[0, 2, 3]])  # the coefficients touch only the mask term


# ---- the real anchor-based machinery: yolov5n's three levels and anchors -------------------------------------------

# rows deliberately not grouped by image: image 1, image 0, image 1
TARGETS = torch.tensor([[1, 0, 0.30, 0.40, 0.30, 0.40], [0, 2, 0.60, 0.50, 0.50, 0.60], [1, 1, 0.75, 0.70, 0.25, 0.30]])
NM_REAL = 4


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n.yaml", nc=3)


def _rect_mask(h: int, w: int, xywh: list[float]) -> torch.Tensor:
    """A binary mask filling the central part of a normalised box (non-overlapping for TARGETS)."""
    cx, cy, bw, bh = xywh
    m = torch.zeros(h, w)
    m[int((cy - bh / 3) * h): int((cy + bh / 3) * h), int((cx - bw / 3) * w): int((cx + bw / 3) * w)] = 1
    return m


def _masks(h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ground truth as (B, h, w) overlap index masks and as (N, h, w) binary masks."""
    binary = torch.stack([_rect_mask(h, w, t[2:].tolist()) for t in TARGETS])
    index = torch.zeros(2, h, w)
    index[1] += binary[0] * 1 + binary[2] * 2  # image 1: its first row is TARGETS[0], its second TARGETS[2]
    index[0] += binary[1] * 1
    assert (binary[0] * binary[2]).sum() == 0  # the two instances of image 1 do not overlap
    return index, binary


def _random_outputs(nc: int = 3, nm: int = NM_REAL) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(1)
    levels = [torch.randn(2, 3, s, s, 5 + nc + nm) for s in (8, 4, 2)]  # 64 px input, strides 8 / 16 / 32
    return levels, torch.randn(2, nm, 16, 16)


def test_overlap_and_binary_masks_give_the_same_loss(model: DetectionModel) -> None:
    preds = _random_outputs()
    index, binary = _masks()
    loss_o, items_o = SegmentLoss(model, HYP, overlap=True)(preds, TARGETS, index)
    loss_b, items_b = SegmentLoss(model, HYP, overlap=False)(preds, TARGETS, binary)
    assert items_o[1] > 0
    assert torch.allclose(items_o, items_b, rtol=1e-6, atol=0) and torch.allclose(loss_o, loss_b, rtol=1e-6, atol=0)


def test_box_obj_cls_terms_equal_compute_loss(model: DetectionModel) -> None:
    levels, protos = _random_outputs()
    _, det_items = ComputeLoss(model, HYP)([p[..., :8] for p in levels], TARGETS)
    loss, items = SegmentLoss(model, HYP)((levels, protos), TARGETS, _masks()[0])
    assert torch.equal(items[[0, 2, 3]], det_items)
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)


def test_gradients_reach_coefficients_and_prototypes(model: DetectionModel) -> None:
    levels, protos = _random_outputs()
    levels = [p.requires_grad_() for p in levels]
    protos.requires_grad_()
    loss, _ = SegmentLoss(model, HYP)((levels, protos), TARGETS, _masks()[0])
    loss.backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0
    indices = ComputeLoss(model, HYP).build_targets(levels, TARGETS)[2]
    for p, (b, a, gj, gi) in zip(levels, indices):
        assert p.grad is not None
        coef_grad = p.grad[..., -NM_REAL:].abs().sum(-1)  # (B, na, ny, nx)
        positive = torch.zeros_like(coef_grad, dtype=torch.bool)
        positive[b, a, gj, gi] = True
        assert (coef_grad[positive] > 0).all() and (coef_grad[~positive] == 0).all()  # only positives' coefficients learn


def test_no_targets_only_objectness(model: DetectionModel) -> None:
    loss, items = SegmentLoss(model, HYP)(_random_outputs(), torch.zeros(0, 6), torch.zeros(2, 32, 32))
    box, seg, obj, cls = items.tolist()
    assert box == seg == cls == 0 and obj > 0 and torch.isfinite(loss)


def test_bad_inputs_raise(model: DetectionModel) -> None:
    levels, protos = _random_outputs()
    with pytest.raises(ValueError, match="masks"):
        SegmentLoss(model, HYP)((levels, protos), TARGETS)
    with pytest.raises(ValueError, match="5 \\+ nc \\+ nm"):
        SegmentLoss(model, HYP)((levels, protos[:, :2]), TARGETS, _masks()[0])
    with pytest.raises(ValueError, match="3 targets"):
        SegmentLoss(model, HYP, overlap=False)((levels, protos), TARGETS, _masks()[1][:2])


def test_build_loss_registers_segment_with_rescaled_gains() -> None:
    net = _Model(_Head(torch.ones(3, 3, 2), nc=40))
    loss = build_loss(net, {**HYP, "overlap_mask": False}, imgsz=320)
    assert isinstance(loss, SegmentLoss) and loss.overlap is False and loss.names == ("box_loss", "seg_loss", "obj_loss", "cls_loss")
    assert loss.hyp["cls"] == pytest.approx(0.5 * 40 / 80) and loss.hyp["obj"] == pytest.approx(0.25)
    default = build_loss(net, HYP, imgsz=640)
    assert isinstance(default, SegmentLoss) and default.overlap is True  # overlap_mask defaults to True like YOLOv5
