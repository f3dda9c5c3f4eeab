"""The end-to-end (NMS-free) head: one-to-one assignment, the two-branch loss and its schedule, detached one-to-one
features, the top-k decode, fusing, and the head's refusals. Export parity is in test_format_matrix.py (its end2end
config); training through the Trainer in test_train_every_backbone.py (every registered head)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.heads.end2end import End2EndDetect, End2EndOutput, topk_detections
from models.model import DetectionModel
from tests.conftest import calibrate_bn, random_images, rounding_tol
from utils.loss import build_loss
from utils.loss.anchor_free import AnchorFreeLoss
from utils.loss.assigner import TaskAlignedAssigner
from utils.loss.end2end import ONE2MANY_END, ONE2MANY_START, End2EndLoss, one2many_weight
from utils.nms import non_max_suppression

CFG = Path(__file__).resolve().parents[1] / "models" / "yolo26n_mobilenetv4_conv_small.yaml"
HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


def brute_force_one_to_one(scores: np.ndarray, pred: np.ndarray, points: np.ndarray, labels: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Per point, the gt it learns (-1: background), by the definitions alone, one image: each gt takes its inside point
    of highest score^0.5 * IoU^6; a point taken by several gts keeps the one of highest IoU."""
    claims: dict[int, list[tuple[float, int]]] = {}
    for m, (gt, c) in enumerate(zip(gts, labels)):
        best, best_p = 0.0, -1
        for p, (pt, box) in enumerate(zip(points, pred)):
            if not (gt[0] < pt[0] < gt[2] and gt[1] < pt[1] < gt[3]):
                continue
            iw = max(0.0, min(gt[2], box[2]) - max(gt[0], box[0]))
            ih = max(0.0, min(gt[3], box[3]) - max(gt[1], box[1]))
            inter = iw * ih
            iou = inter / ((gt[2] - gt[0]) * (gt[3] - gt[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter)
            metric = scores[p, c] ** 0.5 * iou**6
            if metric > best:
                best, best_p = metric, p
        if best_p >= 0:
            claims.setdefault(best_p, []).append((iou_of(gt, pred[best_p]), m))
    owner = np.full(len(points), -1)
    for p, cands in claims.items():
        owner[p] = max(cands, key=lambda t: (t[0], -t[1]))[1]
    return owner


def iou_of(a: np.ndarray, b: np.ndarray) -> float:
    """Plain IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("seed", range(5))
def test_one_to_one_assignment_matches_brute_force(seed: int) -> None:
    gen = np.random.default_rng(seed)
    n, m, nc = 64, 4, 3
    points = np.stack(np.meshgrid(np.arange(8) + 0.5, np.arange(8) + 0.5), -1).reshape(-1, 2) * 4  # 8x8 grid, stride 4
    centre = points + gen.uniform(-2, 2, (n, 2))
    half = gen.uniform(2, 8, (n, 2))
    pred = np.concatenate((centre - half, centre + half), 1)
    scores = gen.uniform(0.05, 0.95, (n, nc))
    gt_c = gen.uniform(4, 28, (m, 2))
    gt_half = gen.uniform(3, 9, (m, 2))
    gts = np.concatenate((gt_c - gt_half, gt_c + gt_half), 1)
    labels = gen.integers(0, nc, m)
    t = lambda a: torch.tensor(a, dtype=torch.float64)[None]  # noqa: E731
    _, _, target_scores, fg, gt_idx = TaskAlignedAssigner(topk=1, num_classes=nc)(
        t(scores), t(pred), torch.tensor(points, dtype=torch.float64), t(labels[:, None].astype(float)), t(gts),
        torch.ones(1, m, 1, dtype=torch.bool))
    got = np.where(fg[0].numpy(), gt_idx[0].numpy(), -1)
    want = brute_force_one_to_one(scores, pred, points, labels, gts)
    assert (want >= 0).sum() >= 2, "too few matches for the comparison to mean something"
    np.testing.assert_array_equal(got, want)
    assert len(set(got[got >= 0])) == (got >= 0).sum(), "one-to-one: no gt keeps two points"
    assert (target_scores[0].sum(-1)[~fg[0]] == 0).all()


def test_schedule_moves_weight_to_the_one_to_one_branch() -> None:
    epochs = 11
    w = [one2many_weight(e, epochs) for e in range(epochs)]
    assert w[0] == pytest.approx(ONE2MANY_START) and w[-1] == pytest.approx(ONE2MANY_END)
    steps = np.diff(w)
    np.testing.assert_allclose(steps, steps[0], atol=1e-12)  # linear
    assert steps[0] < 0
    assert one2many_weight(0, 1) == ONE2MANY_END  # a one-epoch run ends where any run ends


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    """A BN-calibrated 3-class end-to-end detector."""
    torch.manual_seed(0)
    return calibrate_bn(DetectionModel(CFG, nc=3), (4, 3, 64, 64), normalise=False)


def targets() -> torch.Tensor:
    """Two images' labels [image, class, cx, cy, w, h] (normalised)."""
    return torch.tensor([[0, 0, 0.3, 0.3, 0.3, 0.2], [0, 2, 0.7, 0.6, 0.25, 0.4], [1, 1, 0.5, 0.5, 0.5, 0.5]])


def test_loss_is_the_scheduled_sum_of_both_branches(model: DetectionModel) -> None:
    model.train()
    preds = model(random_images((2, 3, 64, 64), normalise=False))
    assert isinstance(preds, End2EndOutput) and len(preds.one2many) == len(preds.one2one) == 3
    loss = build_loss(model, HYP, 64)
    assert isinstance(loss, End2EndLoss)
    many, _ = AnchorFreeLoss(model, HYP, topk=10)(preds.one2many, targets())
    one, _ = AnchorFreeLoss(model, HYP, topk=1)(preds.one2one, targets())
    assert not torch.isclose(many, one), "the branches must differ for the weighting to be visible"
    for epoch, epochs in ((0, 10), (5, 10), (9, 10)):
        loss.start_epoch(epoch, epochs)
        w = one2many_weight(epoch, epochs)
        total, items = loss(preds, targets())
        torch.testing.assert_close(total, w * many + (1 - w) * one)
        assert items.shape == (3,) and items[2] == 0  # reg_max 1: no DFL term


def test_one_to_one_branch_trains_only_itself(model: DetectionModel) -> None:
    """The one-to-one loss reaches its own branch only (detached features); the one-to-many loss reaches the backbone."""
    model.train()
    backbone = next(model.model[0].parameters())
    for branch, expect_backbone in (("one2one", False), ("one2many", True)):
        model.zero_grad(set_to_none=True)
        preds = model(random_images((2, 3, 64, 64), normalise=False))
        loss, _ = AnchorFreeLoss(model, HYP, topk=1)(getattr(preds, branch), targets())
        loss.backward()
        own = model.head.one2one_cv2 if branch == "one2one" else model.head.cv2
        assert next(own.parameters()).grad is not None
        assert (backbone.grad is not None and backbone.grad.abs().sum() > 0) == expect_backbone, branch
    model.zero_grad(set_to_none=True)
    model.eval()


def reference_topk(boxes: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """NumPy reference: one image's (position, class) pairs sorted by score, the k best as [box, score, class] rows."""
    pos, cls = np.unravel_index(np.argsort(-scores, axis=None, kind="stable")[:k], scores.shape)
    return np.concatenate((boxes[pos], scores[pos, cls][:, None], cls[:, None].astype(float)), 1)


@pytest.mark.parametrize(("n", "nc", "max_det"), [(50, 4, 300), (50, 4, 7), (200, 1, 30), (10, 80, 10)])
def test_topk_decode_matches_numpy(n: int, nc: int, max_det: int) -> None:
    gen = torch.Generator().manual_seed(n + nc)
    boxes, scores = torch.rand(2, n, 4, generator=gen, dtype=torch.float64) * 100, torch.rand(2, n, nc, generator=gen, dtype=torch.float64)
    rows = topk_detections(boxes, scores, max_det)
    assert rows.shape == (2, min(max_det, n), 6)
    for b in range(2):
        np.testing.assert_array_equal(rows[b].numpy(), reference_topk(boxes[b].numpy(), scores[b].numpy(), min(max_det, n)))


def test_fuse_drops_the_one_to_many_branch_and_keeps_the_output(model: DetectionModel) -> None:
    import copy

    ref_model = copy.deepcopy(model).eval()
    for branch in ref_model.head.one2one_cv3:  # spread the scores, or agreement at the class prior proves nothing
        torch.nn.init.zeros_(branch[-1].bias)
    x = random_images((2, 3, 64, 96), normalise=False)
    with torch.no_grad():
        ref, raw = ref_model(x)
        fused = copy.deepcopy(ref_model).fuse()
        got, fused_raw = fused(x)
    assert len(raw.one2many) == 3 and fused_raw.one2many == []
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in ref_model.parameters())
    n_positions = 8 * 12 + 4 * 6 + 2 * 3
    assert ref.shape == got.shape == (2, n_positions, 6)  # k = min(max_det 300, positions)
    tol = rounding_tol(fused)
    assert ref[..., 4].max() - ref[..., 4].min() > 10 * tol
    np.testing.assert_allclose(got[..., :4], ref[..., :4], atol=tol * float(ref[..., :4].abs().max()))
    np.testing.assert_allclose(got[..., 4:], ref[..., 4:], atol=tol)


def test_output_reads_as_final_rows(model: DetectionModel) -> None:
    """NMS is not run on the head's output: the rows above the threshold come back as they are, best first."""
    model.eval()
    with torch.no_grad():
        out = model(random_images((1, 3, 64, 64), normalise=False))
    dets = non_max_suppression(out, conf_thres=0.0, max_det=1000, head=model.head_kind)
    assert model.head_kind == "end2end"
    torch.testing.assert_close(dets[0], out[0][0][out[0][0][:, 4] > 0])
    assert math.isclose(float(dets[0][0, 4]), float(out[0][0, :, 4].max()))


def test_yaml_arguments_and_refusals() -> None:
    head = DetectionModel(CFG, nc=5).head
    assert isinstance(head, End2EndDetect) and (head.reg_max, head.max_det, head.max_detections) == (1, 300, 300)
    assert head.policy.nms_export is False and head.policy.tta_reason
    assert "tflite" in (head.policy.export_formats or ()) and "tflite" not in dict(head.policy.export_refusals)
    with pytest.raises(ValueError, match="final detections"):
        End2EndDetect.split_output(torch.zeros(1, 5, 6))
