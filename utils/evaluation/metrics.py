"""Detection metrics: prediction/label matching, COCO-style AP and its curves, confusion matrix, fitness.

Nothing here plots: the curves come back as data and utils.evaluation.report draws them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from utils.boxes import box_iou
from utils.curves import smooth

LOGGER = logging.getLogger("mobile_yolo")

__all__ = ["APStats", "ConfusionMatrix", "Curves", "ap_per_class", "class_ap_stats", "compute_ap", "default_iouv", "fitness",
           "match_from_iou", "match_predictions", "smooth"]


def default_iouv(device: torch.device | str | None = None) -> torch.Tensor:
    """The ten COCO IoU thresholds 0.50:0.05:0.95 used for mAP@0.5:0.95."""
    return torch.linspace(0.5, 0.95, 10, device=device)


def _greedy_pairs(iou: np.ndarray, allowed: np.ndarray, min_iou: float, strict: bool = False) -> np.ndarray:
    """Greedy one-to-one (label, detection) matching, highest IoU first; returns (k, 3) rows [label, det, iou]."""
    ok = allowed & ((iou > min_iou) if strict else (iou >= min_iou))
    li, di = np.nonzero(ok)
    if not li.size:
        return np.zeros((0, 3))
    vals = iou[li, di]
    order = np.argsort(-vals, kind="stable")
    used_l, used_d, rows = set(), set(), []
    for k in order:
        a, b = int(li[k]), int(di[k])
        if a not in used_l and b not in used_d:
            used_l.add(a)
            used_d.add(b)
            rows.append((a, b, vals[k]))
    return np.asarray(rows, dtype=np.float64)


def _score_order_matches(iou: np.ndarray, allowed: np.ndarray, thresholds: np.ndarray, order: np.ndarray) -> np.ndarray:
    """COCO's (pycocotools') matching at each threshold: detections in `order` (highest score first) each take the
    still-unmatched allowed label of highest IoU >= the threshold; returns (n, t) correctness."""
    m, n = iou.shape
    t = thresholds.size
    correct = np.zeros((n, t), dtype=bool)
    iou = np.where(allowed, iou, -1.0)
    free = np.ones((m, t), dtype=bool)  # labels not yet matched, per threshold
    cols = np.arange(t)
    for d in order[(iou[:, order] >= thresholds.min()).any(0)]:  # only detections that can match at all
        cand = np.where(free, iou[:, d : d + 1], -1.0)  # (m, t)
        best = cand.argmax(0)
        hit = cand[best, cols] >= thresholds
        free[best[hit], cols[hit]] = False
        correct[d] = hit
    return correct


def match_from_iou(
    iou: torch.Tensor, label_cls: torch.Tensor, det_cls: torch.Tensor, iouv: torch.Tensor, conf: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, t) correctness of n detections at each IoU threshold from their (m, n) IoU with m labels (boxes or masks alike).

    Matched as COCO does: by confidence (`conf`; without it, the given order, highest score first as NMS returns them),
    each detection takes the best unmatched label of its class, separately at each threshold. Matching by highest IoU
    first instead gives a label to a low-score duplicate and counts the high-score one false, which drags the AP of
    outputs with overlapping duplicates (NMS-free heads, loose NMS) far below COCO's."""
    n, t = iou.shape[1], iouv.numel()
    correct = np.zeros((n, t), dtype=bool)
    if n and iou.shape[0]:
        same_cls = (label_cls.reshape(-1, 1) == det_cls.reshape(1, -1)).cpu().numpy()
        thresholds = iouv.detach().cpu().numpy().astype(np.float64)
        order = np.argsort(-conf.detach().cpu().numpy().reshape(-1), kind="stable") if conf is not None else np.arange(n)
        correct = _score_order_matches(iou.detach().float().cpu().numpy().astype(np.float64), same_cls, thresholds, order)
    return torch.from_numpy(correct).to(iou.device)


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Mark each detection (n, 6+) correct or not at every IoU threshold against labels (m, 5) [cls, x1, y1, x2, y2]."""
    if not detections.shape[0] or not labels.shape[0]:
        return torch.zeros((detections.shape[0], iouv.numel()), dtype=torch.bool, device=detections.device)
    iou = box_iou(labels[:, 1:5].float(), detections[:, :4].float())
    return match_from_iou(iou, labels[:, 0], detections[:, 5], iouv, detections[:, 4])


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """COCO 101-point interpolated AP from cumulative recall/precision; also returns the envelope (mpre, mrec)."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([1.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # precision envelope (monotone non-increasing)
    rec, pre = mrec[1:-1], mpre[1:-1]  # the real points, without the sentinels
    # COCO rule: at each of 101 recall thresholds take the envelope precision of the first point reaching it, else 0.
    idx = np.searchsorted(rec, np.linspace(0.0, 1.0, 101), side="left")
    q = np.zeros(101)
    reached = idx < rec.size
    q[reached] = pre[idx[reached]]
    return float(q.mean()), mpre, mrec


@dataclass(frozen=True, eq=False)
class Curves:
    """Per-class curves for the PR, F1, P and R plots; row i belongs to classes[i]."""

    px: np.ndarray  # (1000,) the x axis: recall for `pr`, confidence for `f1`, `p` and `r`
    pr: np.ndarray  # (k, 1000) precision envelope at recall px, first IoU threshold
    f1: np.ndarray  # (k, 1000) F1 against confidence
    p: np.ndarray  # (k, 1000) precision against confidence
    r: np.ndarray  # (k, 1000) recall against confidence
    ap: np.ndarray  # (k, t) AP at each IoU threshold (the PR plot's legend)
    classes: np.ndarray  # (k,) class indices


@dataclass(frozen=True, eq=False)
class APStats:
    """Per present class: TP/FP counts, P, R and F1 at the confidence of the best smoothed mean F1, AP per IoU threshold."""

    tp: np.ndarray  # (k,)
    fp: np.ndarray  # (k,)
    p: np.ndarray  # (k,)
    r: np.ndarray  # (k,)
    f1: np.ndarray  # (k,)
    ap: np.ndarray  # (k, t)
    classes: np.ndarray  # (k,) int class indices, sorted
    curves: Curves


def class_ap_stats(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, eps: float = 1e-16) -> APStats:
    """Per-class AP at each IoU threshold from (n, t) correctness, plus the curves behind it (returned, never plotted here)."""
    tp, conf, pred_cls, target_cls = (np.asarray(a) for a in (tp, conf, pred_cls, target_cls))
    tp = (tp[:, None] if tp.ndim == 1 else tp).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    unique_classes, nt = np.unique(target_cls, return_counts=True)
    nc, niou = unique_classes.shape[0], tp.shape[1]
    px = np.linspace(0, 1, 1000)
    ap, p, r = np.zeros((nc, niou)), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    pr_curves = np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (1 - tp[sel]).cumsum(0)
        recall = tpc / (nt[ci] + eps)
        precision = tpc / (tpc + fpc)
        r[ci] = np.interp(-px, -conf[sel], recall[:, 0], left=0)  # confidence decreases along the list
        p[ci] = np.interp(-px, -conf[sel], precision[:, 0], left=1)
        for j in range(niou):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                pr_curves[ci] = np.interp(px, mrec, mpre)
    f1 = 2 * p * r / (p + r + eps)
    classes = unique_classes.astype(int)
    curves = Curves(px=px, pr=pr_curves, f1=f1, p=p, r=r, ap=ap, classes=classes)
    best = int(smooth(f1.mean(0), 0.1).argmax()) if nc else 0
    p_best, r_best = p[:, best], r[:, best]
    tp_out = (r_best * nt).round()
    fp_out = (tp_out / (p_best + eps) - tp_out).round()
    return APStats(tp=tp_out, fp=fp_out, p=p_best, r=r_best, f1=f1[:, best], ap=ap, classes=classes, curves=curves)


def ap_per_class(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, eps: float = 1e-16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """YOLOv5's (tp, fp, p, r, f1, ap, classes) tuple of class_ap_stats; plots come from its curves (utils.evaluation.report)."""
    s = class_ap_stats(tp, conf, pred_cls, target_cls, eps)
    return s.tp, s.fp, s.p, s.r, s.f1, s.ap, s.classes


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness as 0.1*mAP@0.5 + 0.9*mAP@0.5:0.95 from [P, R, mAP50, mAP50-95] rows."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x, dtype=np.float64)[..., :4] * w).sum(-1)


class ConfusionMatrix:
    """Class confusion counts at fixed confidence/IoU thresholds; row = predicted class, column = true class, last = background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45) -> None:
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image: detections (n, 6) xyxy, conf, cls (or None) against labels (m, 5) cls, xyxy.

        With detections=None, labels may also be just the (m,) class vector.
        """
        gt_cls = (labels if labels.ndim == 1 else labels[:, 0]).long().cpu().numpy()
        if detections is None or not detections.shape[0]:
            np.add.at(self.matrix[self.nc], gt_cls, 1)  # every label missed (row view: updates self.matrix)
            return
        detections = detections[detections[:, 4] > self.conf]
        det_cls = detections[:, 5].long().cpu().numpy()
        matched_det = np.zeros(len(det_cls), dtype=bool)
        matched_lab = np.zeros(len(gt_cls), dtype=bool)
        if len(det_cls) and len(gt_cls):
            iou = box_iou(labels[:, 1:5].float(), detections[:, :4].float()).cpu().numpy()
            pairs = _greedy_pairs(iou, np.ones_like(iou, dtype=bool), self.iou_thres, strict=True).astype(int)
            for li, di, _ in pairs:
                self.matrix[det_cls[di], gt_cls[li]] += 1
                matched_lab[li] = matched_det[di] = True
        np.add.at(self.matrix[self.nc], gt_cls[~matched_lab], 1)  # missed labels -> background (row view)
        np.add.at(self.matrix[:, self.nc], det_cls[~matched_det], 1)  # unmatched detections -> false positives (column view)

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class true and false positive counts (background excluded)."""
        tp = np.diag(self.matrix)
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]
