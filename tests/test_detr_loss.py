"""RT-DETR's loss: the Hungarian matcher against brute force, the cost by hand, the varifocal and box terms, denoising, a fit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from models.heads.rtdetr import DenoisingMeta, DETROutput
from tests.conftest import EPS32
from utils.loss.detr import (
    DETRLoss,
    denoising_match,
    generalized_box_iou,
    hungarian_match,
    match_cost,
    split_targets,
    varifocal_loss,
    varifocal_targets,
)

NC = 3
HYP = {"cls": 1.0, "box": 5.0, "giou": 2.0}
# [image, class, cx, cy, w, h], normalised; image 2 has no gts
TARGETS = torch.tensor(
    [
        [0, 1, 0.30, 0.30, 0.30, 0.25],
        [0, 2, 0.70, 0.65, 0.20, 0.34],
        [1, 0, 0.45, 0.55, 0.36, 0.30],
    ]
)
BATCH = 3


def random_boxes(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random cxcywh boxes (*shape, 4) well inside [0, 1]."""
    centre = 0.2 + 0.6 * torch.rand(*shape, 2, generator=gen)
    size = 0.05 + 0.35 * torch.rand(*shape, 2, generator=gen)
    return torch.cat((centre, size), -1)


def ref_giou(a: tuple[float, ...], b: tuple[float, ...], eps: float = 1e-7) -> float:
    """GIoU of two cxcywh boxes, plain Python float64, with the implementation's eps (1e-7) on the union and hull."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / (union + eps) - (hull - union) / (hull + eps)


def ref_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two cxcywh boxes, plain Python float64."""
    iw = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    ih = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def ref_cost(boxes: torch.Tensor, logits: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor) -> list[list[float]]:
    """The matching cost (Q, n) written out entry by entry in float64, independently of utils.loss.detr."""
    cost = []
    for box, logit in zip(boxes.double().tolist(), logits.double().tolist()):
        row = []
        for gt, c in zip(gt_boxes.double().tolist(), gt_cls.tolist()):
            p = 1 / (1 + math.exp(-logit[c]))
            focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
            l1 = sum(abs(u - v) for u, v in zip(box, gt))
            row.append(2 * focal + 5 * l1 - 2 * ref_giou(tuple(box), tuple(gt)))
        cost.append(row)
    return cost


def test_matcher_matches_brute_force() -> None:
    """On small random cases the matcher's total cost is the brute-force minimum over all injective assignments."""
    cases = [(q, n, seed) for q in range(2, 6) for n in range(1, q + 1) for seed in range(2)]
    for q, n, seed in cases:
        gen = torch.Generator().manual_seed(100 * q + 10 * n + seed)
        n_other = int(torch.randint(0, q + 1, (1,), generator=gen))  # a second image in the batch, possibly empty
        boxes, logits = random_boxes(gen, 2, q), 2 * torch.randn(2, q, NC, generator=gen)
        gt_boxes = [random_boxes(gen, n), random_boxes(gen, n_other)]
        gt_cls = [torch.randint(0, NC, (k,), generator=gen) for k in (n, n_other)]
        indices = hungarian_match(boxes, logits, gt_boxes, gt_cls)
        for i, (pred_idx, gt_idx) in enumerate(indices):
            k = len(gt_cls[i])
            cost = ref_cost(boxes[i], logits[i], gt_boxes[i], gt_cls[i])
            assert pred_idx.dtype == gt_idx.dtype == torch.long and len(pred_idx) == len(gt_idx) == k
            assert len(set(pred_idx.tolist())) == k and all(0 <= p < q for p in pred_idx.tolist())  # injective, in range
            assert sorted(gt_idx.tolist()) == list(range(k))  # n <= Q: every gt matched exactly once
            assert pred_idx.tolist() == sorted(pred_idx.tolist())
            got = sum(cost[p][g] for p, g in zip(pred_idx.tolist(), gt_idx.tolist()))
            best = min((sum(cost[p][g] for g, p in enumerate(perm)) for perm in itertools.permutations(range(q), k)), default=0.0)
            # The matcher solves float32 costs: each entry is off by a few ulps of the largest entry (16 ulps is
            # generous), so its optimum may exceed the float64 optimum by at most k such errors (near-ties).
            scale = max([1.0] + [abs(c) for row in cost for c in row])
            assert got == pytest.approx(best, abs=16 * max(k, 1) * EPS32 * scale), (q, n, seed, i)


def test_cost_by_hand() -> None:
    """One query, one gt: logit 0 (p = 1/2), L1 0.1, GIoU 1/3, worked out by hand; plus a disjoint pair's GIoU."""
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    logits = torch.tensor([[3.0, 0.0, -3.0]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    # class 1: pos = 0.25 * 0.5^2 * ln 2, neg = 0.75 * 0.5^2 * ln 2 -> -0.125 ln 2; xyxy (.4,.4,.6,.6) vs (.5,.4,.7,.6):
    # inter 0.02, union 0.06, hull 0.06 -> GIoU = IoU = 1/3, here 0.02 / (0.06 + 1e-7) with the implementation's eps
    expected = 2 * (-0.125 * math.log(2)) + 5 * 0.1 - 2 * 0.02 / (0.06 + 1e-7)
    # float32 inputs (0.1, 0.2 are not exact) and a handful of operations: a few ulps of the O(1) terms
    assert float(match_cost(boxes, logits, gt, torch.tensor([1]))) == pytest.approx(expected, abs=8 * EPS32)
    disjoint = generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]]))
    assert disjoint.shape == (1, 1) and float(disjoint) == pytest.approx(-1 / 3, abs=8 * EPS32)  # IoU 0, hull 3, union 2


def test_nonfinite_cost_is_zero() -> None:
    """NaN inputs (e.g. a diverged query) give 0 cost entries, so scipy still gets a finite matrix."""
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [float("nan")] * 4])
    cost = match_cost(boxes, torch.zeros(2, NC), torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([0]))
    assert torch.isfinite(cost).all() and float(cost[1, 0]) == 0.0


def test_empty_image_and_empty_batch() -> None:
    """No gts: zero box losses, a finite total and a working backward, with and without gts elsewhere in the batch."""
    gen = torch.Generator().manual_seed(0)
    loss = DETRLoss(NC, HYP)
    for targets in (torch.zeros(0, 6), TARGETS[TARGETS[:, 0] == 0]):
        boxes = random_boxes(gen, 2, 2, 6).requires_grad_()
        logits = torch.randn(2, 2, 6, NC, generator=gen).requires_grad_()
        enc_boxes, enc_logits = random_boxes(gen, 2, 6).requires_grad_(), torch.randn(2, 6, NC, generator=gen).requires_grad_()
        total, items = loss(DETROutput(boxes, logits, enc_boxes, enc_logits, None), targets)
        assert torch.isfinite(total) and total.dim() == 0 and items.shape == (3,) and not items.requires_grad
        total.backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (boxes, logits, enc_boxes, enc_logits))
        gt_boxes, gt_cls = split_targets(targets, 2)
        empty = hungarian_match(boxes[-1, 1:], logits[-1, 1:], gt_boxes[1:], gt_cls[1:])  # image 1 alone: no gts
        terms = loss.terms(boxes[-1, 1:], logits[-1, 1:], gt_boxes[1:], gt_cls[1:], empty, 0).detach()
        assert len(empty[0][0]) == 0 and float(terms[0]) == 0.0 and float(terms[2]) == 0.0 and float(terms[1]) > 0
        if not len(targets):
            assert float(items[0]) == 0.0 and float(items[2]) == 0.0


def perfect_output(gen: torch.Generator, layers: int = 2, queries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, Q, 4) random boxes and logits whose last layer's first queries are the gts exactly, with confident classes."""
    boxes, logits = random_boxes(gen, layers, BATCH, queries), torch.randn(layers, BATCH, queries, NC, generator=gen) - 4
    gt_boxes, gt_cls = split_targets(TARGETS, BATCH)
    for i, (b, c) in enumerate(zip(gt_boxes, gt_cls)):
        boxes[-1, i, : len(b)] = b
        logits[-1, i, torch.arange(len(c)), c] = 6.0
    return boxes, logits


def test_perfect_prediction() -> None:
    """Main-layer boxes equal to the gts: L1 exactly 0, GIoU loss 0 up to the IoU's eps, and the right matching."""
    gen = torch.Generator().manual_seed(1)
    boxes, logits = perfect_output(gen)
    out = DETROutput(boxes, logits, random_boxes(gen, BATCH, 8), torch.randn(BATCH, 8, NC, generator=gen), None)
    total, items = DETRLoss(NC, HYP)(out, TARGETS)
    assert float(items[2]) == 0.0
    # bbox_iou adds eps = 1e-7 to the heights and the union, so identical boxes of area >= 0.05 give 1 - IoU < 1e-5
    assert 0.0 <= float(items[0]) < 1e-5
    gt_boxes, gt_cls = split_targets(TARGETS, BATCH)
    indices = hungarian_match(boxes[-1], logits[-1], gt_boxes, gt_cls)
    assert [(p.tolist(), g.tolist()) for p, g in indices] == [([0, 1], [0, 1]), ([0], [0]), ([], [])]


def test_items_are_gain_weighted_main_layer() -> None:
    """Eval-shaped output (L = 1, no dn): total = main + encoder terms; items = main terms, scaled by the hyp gains."""
    gen = torch.Generator().manual_seed(2)
    boxes, logits = random_boxes(gen, 1, BATCH, 7), torch.randn(1, BATCH, 7, NC, generator=gen)
    enc_boxes, enc_logits = random_boxes(gen, BATCH, 7), torch.randn(BATCH, 7, NC, generator=gen)
    out = DETROutput(boxes, logits, enc_boxes, enc_logits, None)
    gt_boxes, gt_cls = split_targets(TARGETS, BATCH)
    loss = DETRLoss(NC, HYP)
    total, items = loss(out, TARGETS)
    main = loss.matched_terms(boxes[0], logits[0], gt_boxes, gt_cls)
    enc = loss.matched_terms(enc_boxes, enc_logits, gt_boxes, gt_cls)
    torch.testing.assert_close(items, main)
    torch.testing.assert_close(total, main.sum() + enc.sum())
    _, unit = DETRLoss(NC, {"cls": 1.0, "box": 1.0, "giou": 1.0})(out, TARGETS)
    _, scaled = DETRLoss(NC, {"cls": 2.0, "box": 3.0, "giou": 4.0})(out, TARGETS)
    torch.testing.assert_close(scaled, unit * torch.tensor([4.0, 2.0, 3.0]))  # names order: giou, cls, l1
    assert DETRLoss.names == ("giou_loss", "cls_loss", "l1_loss")


def dn_output(gen: torch.Generator, groups: int = 2, queries: int = 6) -> tuple[torch.Tensor, torch.Tensor, DenoisingMeta]:
    """(L, B, num_dn + Q, ...) boxes/logits whose positive denoising queries carry exactly their gt boxes."""
    gt_boxes, _ = split_targets(TARGETS, BATCH)
    max_n = max(len(b) for b in gt_boxes)
    num_dn = 2 * max_n * groups  # a positive and a negative query per gt slot and group
    positive = [torch.cat([g * 2 * max_n + torch.arange(len(b)) for g in range(groups)]) for b in gt_boxes]
    boxes = random_boxes(gen, 2, BATCH, num_dn + queries)
    for i, b in enumerate(gt_boxes):
        boxes[:, i, positive[i]] = b.repeat(groups, 1)
    return boxes, torch.randn(2, BATCH, num_dn + queries, NC, generator=gen), DenoisingMeta(num_dn, groups, positive)


def test_denoising_terms() -> None:
    """Exact positive dn boxes give zero dn box terms; total = no-dn total + the dn terms of every layer; moving them costs."""
    gen = torch.Generator().manual_seed(3)
    boxes, logits, dn = dn_output(gen)
    enc_boxes, enc_logits = random_boxes(gen, BATCH, 6), torch.randn(BATCH, 6, NC, generator=gen)
    loss = DETRLoss(NC, HYP)
    gt_boxes, gt_cls = split_targets(TARGETS, BATCH)
    indices = denoising_match(dn, [len(c) for c in gt_cls])
    assert indices[0][1].tolist() == [0, 1, 0, 1] and len(indices[2][0]) == 0
    num = len(TARGETS) * dn.groups
    dn_terms = [loss.terms(boxes[k, :, : dn.num_dn], logits[k, :, : dn.num_dn], gt_boxes, gt_cls, indices, num) for k in range(2)]
    for t in dn_terms:
        assert float(t[2]) == 0.0 and 0.0 <= float(t[0]) < 1e-5  # as in test_perfect_prediction
    total, items = loss(DETROutput(boxes, logits, enc_boxes, enc_logits, dn), TARGETS)
    plain, plain_items = loss(DETROutput(boxes[:, :, dn.num_dn :], logits[:, :, dn.num_dn :], enc_boxes, enc_logits, None), TARGETS)
    torch.testing.assert_close(items, plain_items)
    torch.testing.assert_close(total, plain + sum(t.sum() for t in dn_terms))
    moved = boxes.clone()
    moved[:, :, : dn.num_dn, :2] += 0.05
    assert float(loss(DETROutput(moved, logits, enc_boxes, enc_logits, dn), TARGETS)[0]) > float(total)
    with pytest.raises(ValueError, match="positive denoising"):
        denoising_match(DenoisingMeta(dn.num_dn, 3, dn.positive), [len(c) for c in gt_cls])


def test_varifocal() -> None:
    """Unmatched: the higher score costs more; matched: the target is the IoU with the gt, at its class only."""
    logits = torch.tensor([[[-2.0], [1.0]]])
    per_query = varifocal_loss(logits, torch.zeros_like(logits), torch.zeros_like(logits))
    assert float(per_query[0, 1, 0]) > float(per_query[0, 0, 0]) > 0
    gen = torch.Generator().manual_seed(4)
    boxes, logits = random_boxes(gen, BATCH, 5), torch.randn(BATCH, 5, NC, generator=gen)
    gt_boxes, gt_cls = split_targets(TARGETS, BATCH)
    boxes[0, 3] = gt_boxes[0][1] + torch.tensor([0.03, -0.02, 0.05, 0.0])  # overlapping, so the IoU is not 0
    none = torch.zeros(0, dtype=torch.long)
    indices = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([4]), torch.tensor([0])), (none, none)]
    matched = (torch.tensor([0, 0, 1]), torch.tensor([1, 3, 4]), torch.cat(gt_boxes), torch.cat(gt_cls))
    score, label = varifocal_targets(boxes, logits, matched)
    assert int(label.sum()) == 3 and float(score[label == 0].abs().max()) == 0.0
    for b, q, gt, c in zip(*matched):
        assert float(label[b, q, c]) == 1.0
        assert float(score[b, q, c]) == pytest.approx(ref_iou(tuple(boxes[b, q].tolist()), tuple(gt.tolist())), abs=1e-5)
    assert float(score[0, 3, 2]) > 0.5
    # through the loss: raising an unmatched query's logit raises the class term
    loss = DETRLoss(NC, HYP)
    before = loss.terms(boxes, logits, gt_boxes, gt_cls, indices, 3)
    logits[0, 0] += 2.0
    after = loss.terms(boxes, logits, gt_boxes, gt_cls, indices, 3)
    assert float(after[1]) > float(before[1]) and torch.equal(after[[0, 2]], before[[0, 2]])


def test_loss_decreases() -> None:
    """Adam on free logits and box logits (decoder layers and encoder) halves the loss and shrinks the main L1 item."""
    torch.manual_seed(5)
    layers, queries = 3, 10
    box_logits = nn.Parameter(torch.randn(layers, BATCH, queries, 4))
    logits = nn.Parameter(torch.randn(layers, BATCH, queries, NC))
    enc_box_logits, enc_logits = nn.Parameter(torch.randn(BATCH, queries, 4)), nn.Parameter(torch.randn(BATCH, queries, NC))
    opt = torch.optim.Adam([box_logits, logits, enc_box_logits, enc_logits], lr=0.05)
    loss = DETRLoss(NC, HYP)
    history = []
    for _ in range(100):
        total, items = loss(DETROutput(box_logits.sigmoid(), logits, enc_box_logits.sigmoid(), enc_logits, None), TARGETS)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((float(total.detach()), float(items[2])))
    assert history[-1][0] < 0.5 * history[0][0], history[::10]
    assert history[-1][1] < history[0][1], history[::10]


def test_half_inputs_and_bad_inputs() -> None:
    """fp16 predictions (AMP) give a float32 total; wrong class counts and image indices raise ValueError."""
    gen = torch.Generator().manual_seed(6)
    boxes, logits = perfect_output(gen)
    out = DETROutput(boxes.half(), logits.half(), random_boxes(gen, BATCH, 8).half(), torch.randn(BATCH, 8, NC, generator=gen).half(), None)
    total, items = DETRLoss(NC, HYP)(out, TARGETS)
    assert total.dtype == items.dtype == torch.float32 and torch.isfinite(total)
    with pytest.raises(ValueError, match="classes"):
        DETRLoss(NC + 1, HYP)(out, TARGETS)
    with pytest.raises(ValueError, match="image indices"):
        DETRLoss(NC, HYP)(out, TARGETS + torch.tensor([5.0, 0, 0, 0, 0, 0]))
