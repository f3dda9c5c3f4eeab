"""TaskAlignedAssigner against a plain-loop reference on small random cases, plus its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import EPS32
from utils.loss.assigner import TaskAlignedAssigner, pairwise_iou

ALPHA, BETA, EPS = 0.5, 6.0, 1e-9
IMG = 64
STRIDES = (8, 16)
# Float32 error bounds, in units of EPS32 (one ulp at 1; a correctly rounded operation errs by <= EPS32 / 2 relative).
# IoU: inter, area_a, area_b are each a product of two differences of float32 inputs (3 roundings); the union adds
# them with |terms| <= 3 * union (area_a + area_b = union + inter) plus 3 roundings; the ratio 1 more: <= 9 EPS32.
IOU_ULPS = 9.0
# metric = score^alpha * IoU^beta: beta times the IoU error, plus pow, sqrt and product roundings.
METRIC_ULPS = BETA * IOU_ULPS + 3.0
# soft target = metric / max metric * max IoU: two metric errors, one IoU error and two roundings; scores are <= 1, so
# the relative bound is an absolute one. Factor 2: margin over the first-order bound.
SCORE_TOL = 2 * (2 * METRIC_ULPS + IOU_ULPS + 2) * EPS32
# A case where a decision (top-k boundary, best-IoU claimant) hangs on a gap below twice these errors is ill-conditioned.
METRIC_GAP, IOU_GAP = 2 * METRIC_ULPS * EPS32, 2 * IOU_ULPS * EPS32


def _points() -> torch.Tensor:
    """Cell centres of a 64x64 input at strides 8 and 16 in pixels, (80, 2), level by level, row-major."""
    pts = [((x + 0.5) * s, (y + 0.5) * s) for s in STRIDES for y in range(IMG // s) for x in range(IMG // s)]
    return torch.tensor(pts)


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    return inter / (area_a + area_b - inter + EPS)


def _inside(p: list[float], box: list[float]) -> bool:
    margins = (p[0] - box[0], p[1] - box[1], box[2] - p[0], box[3] - p[1])
    assert not any(0 < d <= 1e-6 for d in margins), "ill-conditioned case: a point within float32 rounding of an edge"
    return min(margins) > EPS


def _candidates(metric: dict[int, float], topk: int, stats: dict[str, int]) -> set[int]:
    """Points of positive metric at least the k-th largest, checking that the boundary is not a near-tie."""
    ranked = sorted((v for v in metric.values() if v > 0), reverse=True)
    assert all(v > 1e-30 for v in ranked), "ill-conditioned case: metric near float32 underflow"
    if len(ranked) <= topk:
        return {n for n, v in metric.items() if v > 0}
    stats["truncated"] += 1
    kth, nxt = ranked[topk - 1], ranked[topk]
    assert kth - nxt > METRIC_GAP * kth, "ill-conditioned case: near-tie at the top-k boundary"
    return {n for n, v in metric.items() if v >= kth}


def reference_assign(scores, boxes, points, labels, gts, mask, topk: int, nc: int, stats: dict[str, int] | None = None):
    """The assignment written out with loops over images, gts and points, in float64 (Python floats).

    `stats` counts the gts whose candidates were cut by topk ("truncated") and the points claimed by several ("contested").
    """
    stats = {"truncated": 0, "contested": 0} if stats is None else stats
    scores, boxes, points = scores.tolist(), boxes.tolist(), points.tolist()
    labels, gts, mask = labels.squeeze(-1).long().tolist(), gts.tolist(), mask.squeeze(-1).bool().tolist()
    bs, n, m = len(scores), len(points), len(gts[0])
    fg, gt_idx, tlabels = [[False] * n for _ in range(bs)], [[0] * n for _ in range(bs)], [[nc] * n for _ in range(bs)]
    tscores = [[[0.0] * nc for _ in range(n)] for _ in range(bs)]
    for b in range(bs):
        metric: dict[int, dict[int, float]] = {}
        iou: dict[int, dict[int, float]] = {}
        cands: dict[int, set[int]] = {}
        for j in (j for j in range(m) if mask[b][j]):
            inside = [p for p in range(n) if _inside(points[p], gts[b][j])]
            iou[j] = {p: _iou(gts[b][j], boxes[b][p]) for p in inside}
            metric[j] = {p: scores[b][p][labels[b][j]] ** ALPHA * iou[j][p] ** BETA for p in inside}
            cands[j] = _candidates(metric[j], topk, stats)
        for p in range(n):
            claims = sorted(((iou[j][p], -j) for j in cands if p in cands[j]), reverse=True)
            if not claims:
                continue
            if len(claims) > 1:
                stats["contested"] += 1
                gap = claims[0][0] - claims[1][0]
                assert gap == 0 or gap > IOU_GAP * claims[0][0], "ill-conditioned case: near-tie between claimants"
            fg[b][p], gt_idx[b][p] = True, -claims[0][1]
            tlabels[b][p] = labels[b][gt_idx[b][p]]
        for j in cands:
            own = [p for p in range(n) if fg[b][p] and gt_idx[b][p] == j]
            if own:
                max_metric, max_iou = max(metric[j][p] for p in own), max(iou[j][p] for p in own)
                for p in own:
                    tscores[b][p][labels[b][j]] = metric[j][p] / (max_metric + EPS) * max_iou
    return torch.tensor(fg), torch.tensor(gt_idx), torch.tensor(tlabels), torch.tensor(tscores, dtype=torch.float64)


def _random_boxes(g: torch.Generator, k: int, lo: float, hi: float) -> torch.Tensor:
    """k xyxy boxes with centres anywhere in the image and sides uniform in [lo, hi] pixels."""
    centre = torch.rand(k, 2, generator=g) * IMG
    half = (torch.rand(k, 2, generator=g) * (hi - lo) + lo) / 2
    return torch.cat((centre - half, centre + half), 1)


def make_case(seed: int, bs: int, m: int, nc: int) -> tuple[torch.Tensor, ...]:
    """Random scores and predictions (point +- 1..20 px per side), m padded gts per image with random valid counts.

    Image 0 always gets a near-copy of its first gt (overlap) and a 2x2 px gt between points (contains none); padded
    rows hold random boxes and labels, so only the mask can keep them out.
    """
    g = torch.Generator().manual_seed(seed)
    points = _points()
    n = points.shape[0]
    scores = torch.rand(bs, n, nc, generator=g)
    dist = torch.rand(bs, n, 4, generator=g) * 19 + 1
    pred = torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1)
    gts = torch.stack([_random_boxes(g, m, 4, 40) for _ in range(bs)])
    labels = torch.randint(0, nc, (bs, m, 1), generator=g).float()
    counts = torch.randint(0, m + 1, (bs,), generator=g)
    counts[0] = m
    gts[0, 1] = gts[0, 0] + torch.rand(4, generator=g) * 4 - 2
    gts[0, 2] = torch.tensor([13.0, 13.0, 15.0, 15.0])
    mask = (torch.arange(m)[None] < counts[:, None])[..., None]
    return scores, pred, points, labels, gts, mask


CASES = [  # seed, batch, gts per image (padded), classes, topk
    (0, 2, 4, 3, 10),
    (1, 3, 5, 3, 3),
    (2, 2, 6, 1, 10),
    (3, 1, 3, 1, 1),
    (4, 3, 4, 5, 5),
]


@pytest.mark.parametrize(("seed", "bs", "m", "nc", "topk"), CASES)
def test_matches_reference(seed, bs, m, nc, topk):
    case = make_case(seed, bs, m, nc)
    labels, boxes, scores, fg, gt_idx = TaskAlignedAssigner(topk, nc, ALPHA, BETA, EPS)(*case)
    ref_fg, ref_idx, ref_labels, ref_scores = reference_assign(*case, topk=topk, nc=nc)
    assert fg.any() and (~fg).any()
    assert torch.equal(fg, ref_fg)
    assert torch.equal(gt_idx[fg], ref_idx[fg]) and (gt_idx[~fg] == 0).all()
    assert torch.equal(labels, ref_labels)  # background points: num_classes
    assert (scores.double() - ref_scores).abs().max().item() <= SCORE_TOL
    gts = case[4]
    assert torch.equal(boxes[fg], gts[torch.nonzero(fg)[:, 0], gt_idx[fg]]) and (boxes[~fg] == 0).all()


def test_tiny_and_padded_gts_never_assigned():
    scores, pred, points, labels, gts, mask = make_case(0, 2, 4, 3)
    _, _, _, fg, gt_idx = TaskAlignedAssigner(10, 3)(scores, pred, points, labels, gts, mask)
    assert not (fg[0] & (gt_idx[0] == 2)).any()  # the 2x2 px gt contains no point
    for b in range(2):  # padded rows are never assigned
        assert (gt_idx[b][fg[b]] < int(mask[b].sum())).all()
    nan_padded = torch.where(mask, gts, float("nan"))
    out = TaskAlignedAssigner(10, 3)(scores, pred, points, labels, gts, mask)
    out_nan = TaskAlignedAssigner(10, 3)(scores, pred, points, labels * mask - 7 * ~mask, nan_padded, mask)
    assert all(torch.equal(x, y) for x, y in zip(out, out_nan))  # whatever padded rows hold: nan boxes, bad labels


def test_cases_exercise_topk_and_contested_points():
    stats = {"truncated": 0, "contested": 0}
    for seed, bs, m, nc, topk in CASES:
        reference_assign(*make_case(seed, bs, m, nc), topk=topk, nc=nc, stats=stats)
    assert stats["truncated"] > 0 and stats["contested"] > 0, stats


def test_points_strictly_inside():
    # gt edges through the points at (4, 4) and (20, 20): they are not inside; (12, 12) and the stride-16 (8, 8) are
    points = _points()
    gts = torch.tensor([[[4.0, 4.0, 20.0, 20.0]]])
    pred = gts.expand(1, points.shape[0], 4)
    scores = torch.ones(1, points.shape[0], 1)
    _, _, _, fg, _ = TaskAlignedAssigner(10, 1)(scores, pred, points, torch.zeros(1, 1, 1), gts, torch.ones(1, 1, 1))
    chosen = {tuple(p) for p in points[fg[0]].tolist()}
    assert chosen == {(12.0, 12.0), (8.0, 8.0)}


def test_ties_at_kth_all_kept():
    # every point predicts the gt exactly with the same score: all inside points tie, and all are kept even beyond topk
    points = _points()
    gts = torch.tensor([[[0.0, 0.0, 40.0, 40.0]]])
    n = points.shape[0]
    _, _, scores, fg, _ = TaskAlignedAssigner(3, 2)(
        torch.full((1, n, 2), 0.25), gts.expand(1, n, 4), points, torch.ones(1, 1, 1), gts, torch.ones(1, 1, 1)
    )
    inside = ((points > 0) & (points < 40)).all(1)
    assert torch.equal(fg[0], inside) and int(inside.sum()) > 3
    assert torch.equal(scores[0, inside, 1], torch.ones(int(inside.sum())))  # metric / max metric * IoU 1, exactly
    assert (scores[0, :, 0] == 0).all()


@pytest.mark.parametrize("m", [0, 3])
def test_no_valid_gt_all_background(m):
    scores, pred, points, labels, gts, _ = make_case(5, 2, max(m, 3), 2)
    gts, labels = gts[:, :m], labels[:, :m]
    labels_out, boxes, tscores, fg, gt_idx = TaskAlignedAssigner(10, 2)(scores, pred, points, labels, gts, torch.zeros(2, m, 1))
    assert not fg.any() and (gt_idx == 0).all() and (labels_out == 2).all()
    assert (boxes == 0).all() and (tscores == 0).all()
    assert labels_out.shape == (2, 80) and boxes.shape == (2, 80, 4) and tscores.shape == (2, 80, 2)


def test_gt_order_only_permutes_indices():
    scores, pred, points, labels, gts, mask = make_case(1, 3, 5, 3)
    mask = torch.ones_like(mask)
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = TaskAlignedAssigner(3, 3)(scores, pred, points, labels, gts, mask)
    out_p = TaskAlignedAssigner(3, 3)(scores, pred, points, labels[:, perm], gts[:, perm], mask)
    for a, b in zip(out[:4], out_p[:4]):
        assert torch.equal(a, b)  # the same values in the same (point) order: no float result depends on gt order
    fg = out[3]
    assert torch.equal(perm[out_p[4][fg]], out[4][fg])


def test_pairwise_iou_known_values():
    a = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    b = torch.tensor([[[2.0, 0.0, 6.0, 4.0], [0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 12.0, 12.0], [1.0, 1.0, 1.0, 3.0]]])
    got = pairwise_iou(a, b)[0, 0]
    assert got.shape == (4,)
    assert got[0].item() == pytest.approx(1 / 3, rel=IOU_ULPS * EPS32)  # 8 / 24
    assert got[1].item() == pytest.approx(1.0, rel=IOU_ULPS * EPS32)
    assert got[2].item() == 0 and got[3].item() == 0  # disjoint; zero-area box
    assert math.isfinite(pairwise_iou(b[:, 3:], b[:, 3:]).item())  # 0 / (0 + eps)
