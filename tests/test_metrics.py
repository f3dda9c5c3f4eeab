"""Tests for utils.evaluation.metrics: matching, AP and its curves, confusion matrix, fitness (plots via utils.evaluation.report)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.evaluation.metrics import (
    ConfusionMatrix,
    ap_per_class,
    class_ap_stats,
    compute_ap,
    default_iouv,
    fitness,
    match_from_iou,
    match_predictions,
    smooth,
)
from utils.evaluation.report import plot_confusion, plot_curves

IOUV = default_iouv()


def det(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def lab(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def test_match_exact_box_correct_at_all_thresholds():
    out = match_predictions(det([0, 0, 10, 10, 0.9, 1]), lab([1, 0, 0, 10, 10]), IOUV)
    assert out.dtype == torch.bool and out.shape == (1, 10)
    assert out.all()


def test_match_partial_overlap_threshold_cut():
    # IoU = 70 / 100 -> correct for thresholds 0.50..0.70 only (5 of 10)
    out = match_predictions(det([0, 0, 7, 10, 0.9, 0]), lab([0, 0, 0, 10, 10]), IOUV)
    assert out[0].tolist() == [True] * 5 + [False] * 5


def test_match_class_must_agree():
    out = match_predictions(det([0, 0, 10, 10, 0.9, 2]), lab([1, 0, 0, 10, 10]), IOUV)
    assert not out.any()


def test_match_one_to_one_duplicates_not_double_counted():
    d = det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0])
    out = match_predictions(d, lab([0, 0, 0, 10, 10]), IOUV)
    assert out[0].all() and not out[1].any()


def test_match_greedy_by_iou_two_labels():
    # Two close labels A, B and two detections each overlapping both: the highest-IoU pairs (det0-B 0.905,
    # det1-A 0.9) are taken first, so both detections are correct up to the 0.85 threshold.
    labels = lab([0, 0, 0, 10, 10], [0, 2, 0, 12, 10])
    d = det([1.5, 0, 11.5, 10, 0.9, 0], [0, 0, 9, 10, 0.8, 0])
    out = match_predictions(d, labels, IOUV)
    assert out[:, :8].all()
    assert not out[:, 9].any()


def test_match_empty_inputs():
    assert match_predictions(det(), lab([0, 0, 0, 1, 1]), IOUV).shape == (0, 10)
    assert not match_predictions(det([0, 0, 1, 1, 0.5, 0]), lab(), IOUV).any()


def test_compute_ap_perfect():
    ap, _, _ = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(1.0)


def test_compute_ap_half_recall():
    # one of two objects found, with precision 1: recall thresholds 0..0.5 (51 of 101) score 1
    ap, _, _ = compute_ap(np.array([0.5]), np.array([1.0]))
    assert ap == pytest.approx(51 / 101)


def test_compute_ap_false_positive_first():
    # ranking FP then TP over two objects: precision 0.5 reached at recall 0.5
    ap, mpre, mrec = compute_ap(np.array([0.0, 0.5]), np.array([0.0, 0.5]))
    assert ap == pytest.approx(0.5 * 51 / 101)
    assert np.all(np.diff(mpre) <= 0)  # envelope is non-increasing
    assert mrec[0] == 0 and mrec[-1] == 1


def test_compute_ap_envelope_uses_later_higher_precision():
    # TP, FP, TP over 2 objects: precision [1, .5, .667]; envelope lifts the second point to .667
    ap, _, _ = compute_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


def test_ap_per_class_two_classes():
    tp = np.array([[1] * 10, [0] * 10, [1] * 10, [1] * 10], dtype=bool)
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    pred_cls = np.array([0, 0, 1, 0])
    target_cls = np.array([0, 0, 1, 2])
    tp_o, fp_o, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 1, 2]
    assert ap.shape == (3, 10)
    assert ap[0, 0] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)  # TP, FP, TP for class 0
    assert ap[1].tolist() == pytest.approx([1.0] * 10)
    assert ap[2].tolist() == [0.0] * 10  # no predictions for class 2
    assert p.shape == r.shape == f1.shape == (3,)
    assert np.all((p >= 0) & (p <= 1)) and np.all((r >= 0) & (r <= 1))
    assert r[2] == 0 and tp_o[2] == 0


def test_ap_per_class_perfect_ranking():
    rng = np.random.default_rng(0)
    n = 50
    conf = rng.random(n)
    tp = np.ones((n, 10), dtype=bool)
    cls = rng.integers(0, 3, n)
    *_, p, r, f1, ap, _ = ap_per_class(tp, conf, cls, cls)
    assert np.allclose(ap, 1.0)
    assert np.allclose(p, 1.0) and np.all(r > 0.9)


def test_class_ap_stats_curves_and_their_plots(tmp_path):
    tp = np.array([[1] * 10, [0] * 10, [1] * 10], dtype=bool)
    s = class_ap_stats(tp, np.array([0.9, 0.5, 0.3]), np.array([0, 1, 1]), np.array([0, 1]))
    assert s.classes.tolist() == [0, 1] and s.curves.classes.tolist() == [0, 1]
    assert s.curves.px.shape == (1000,) and s.curves.pr.shape == s.curves.f1.shape == s.curves.p.shape == s.curves.r.shape == (2, 1000)
    assert np.array_equal(s.curves.ap, s.ap)
    assert [a.tolist() for a in ap_per_class(tp, np.array([0.9, 0.5, 0.3]), np.array([0, 1, 1]), np.array([0, 1]))] == [
        a.tolist() for a in (s.tp, s.fp, s.p, s.r, s.f1, s.ap, s.classes)]
    files = plot_curves(s.curves, ["a", "b"], tmp_path, prefix="box_")
    assert [f.name for f in files] == ["box_PR_curve.png", "box_F1_curve.png", "box_P_curve.png", "box_R_curve.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_match_from_iou_is_match_predictions_on_box_iou():
    from utils.boxes import box_iou

    labels = lab([0, 0, 0, 10, 10], [0, 2, 0, 12, 10], [1, 30, 30, 40, 40])
    d = det([1.5, 0, 11.5, 10, 0.9, 0], [0, 0, 9, 10, 0.8, 0], [30, 30, 40, 38, 0.7, 1], [30, 30, 40, 40, 0.6, 0])
    got = match_from_iou(box_iou(labels[:, 1:], d[:, :4]), labels[:, 0], d[:, 5], IOUV)
    assert torch.equal(got, match_predictions(d, labels, IOUV))
    assert got[2, :7].all() and not got[3].any()  # IoU 0.8 for the class-1 box; the class-0 copy of it matches nothing


def test_smooth_window_is_yolov5s():
    """The best-F1 confidence is picked on f1 smoothed as YOLOv5 and ultralytics do: a 101-point box over 1000 points at
    f=0.1 (51 at f=0.05), so P and R at that confidence agree with theirs."""
    for f, width in ((0.1, 101), (0.05, 51)):
        impulse = np.zeros(1000)
        impulse[500] = 1.0
        out = smooth(impulse, f)
        assert np.count_nonzero(out) == width and out.max() == pytest.approx(1 / width)


def test_smooth_keeps_constant_and_length():
    y = np.full(100, 0.3)
    assert np.allclose(smooth(y, 0.1), 0.3)
    assert smooth(np.arange(37.0), 0.05).shape == (37,)


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(nc=3, conf=0.25, iou_thres=0.45)
    labels = lab([0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [2, 50, 50, 60, 60])
    dets = det([0, 0, 10, 10, 0.9, 0],  # correct
               [20, 20, 30, 30, 0.8, 2],  # true 1 predicted as 2
               [80, 80, 90, 90, 0.7, 1],  # false positive (background)
               [50, 50, 60, 60, 0.1, 2])  # below conf -> ignored, so label 2 is missed
    cm.process_batch(dets, labels)
    m = cm.matrix
    assert m[0, 0] == 1 and m[2, 1] == 1
    assert m[1, 3] == 1  # predicted 1 on background
    assert m[3, 2] == 1  # label 2 missed
    assert m.sum() == 4
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [0, 1, 1]


def test_confusion_matrix_no_detections_and_no_labels():
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(None, lab([0, 0, 0, 5, 5], [1, 0, 0, 5, 5]))
    assert cm.matrix[2].tolist() == [1, 1, 0]
    cm.process_batch(None, torch.tensor([1.0]))  # class vector alone, as val passes it for images without detections
    assert cm.matrix[2].tolist() == [1, 2, 0]
    cm.process_batch(det([0, 0, 5, 5, 0.9, 1]), lab())
    assert cm.matrix[1, 2] == 1


def test_confusion_matrix_plot(tmp_path):
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(det([0, 0, 10, 10, 0.9, 0]), lab([0, 0, 0, 10, 10], [1, 40, 40, 50, 50]))
    path = plot_confusion(cm.matrix, ["cat", "dog"], tmp_path)
    assert path == tmp_path / "confusion_matrix.png" and path.stat().st_size > 1000


def test_fitness_weights():
    x = np.array([[0.5, 0.6, 0.7, 0.4], [1.0, 1.0, 0.0, 0.0]])
    assert fitness(x).tolist() == pytest.approx([0.07 + 0.36, 0.0])
    assert fitness(np.array([0, 0, 1.0, 1.0])) == pytest.approx(1.0)


def test_smooth_keeps_length_for_short_curves():
    """results.png smooths 15-epoch curves; an even window once returned n+1 points."""
    for n in (1, 2, 10, 15, 16, 101, 1000):
        assert len(smooth(np.linspace(0, 1, n))) == n
