"""Detection metrics: prediction/label matching, COCO-style AP, confusion matrix and an accumulator for val."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from utils.boxes import box_iou

LOGGER = logging.getLogger("mobile_yolo")

Names = Union[Sequence[str], Mapping[int, str]]


def default_iouv(device: torch.device | str | None = None) -> torch.Tensor:
    """The ten COCO IoU thresholds 0.50:0.05:0.95 used for mAP@0.5:0.95."""
    return torch.linspace(0.5, 0.95, 10, device=device)


def names_dict(names: Names | None) -> dict[int, str]:
    """Normalise a list/tuple/dict of class names to {index: name}."""
    if not names:
        return {}
    return dict(names) if isinstance(names, Mapping) else dict(enumerate(names))


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


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Mark each detection (n, 6) correct or not at every IoU threshold against labels (m, 5) [cls, x1, y1, x2, y2]."""
    n, t = detections.shape[0], iouv.numel()
    correct = np.zeros((n, t), dtype=bool)
    if n and labels.shape[0]:
        iou = box_iou(labels[:, 1:5].float(), detections[:, :4].float()).cpu().numpy()
        same_cls = (labels[:, 0:1] == detections[:, 5]).cpu().numpy()
        thresholds = iouv.detach().cpu().numpy()
        # Greedy matching on IoU-sorted pairs: the matching at threshold t equals the prefix of pairs with IoU >= t,
        # so one pass at the lowest threshold yields every threshold's matching.
        pairs = _greedy_pairs(iou, same_cls, float(thresholds.min()))
        if pairs.shape[0]:
            det_idx = pairs[:, 1].astype(int)
            correct[det_idx] = pairs[:, 2:3] >= thresholds[None, :]
    return torch.from_numpy(correct).to(detections.device)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter a curve over a window of about 2*f of its length, padding with its end values."""
    half = round(len(y) * f)
    nf = 2 * half + 1  # odd window keeps the output length equal to the input's
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


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


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    plot: bool = False,
    save_dir: Path = Path("."),
    names: Names = (),
    eps: float = 1e-16,
    prefix: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class AP at each IoU threshold, plus P/R/F1 at the confidence maximising the smoothed mean F1."""
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
    if plot:
        _plot_curves(px, pr_curves, p, r, f1, ap, unique_classes, names, Path(save_dir), prefix)
    best = int(smooth(f1.mean(0), 0.1).argmax()) if nc else 0
    p, r, f1 = p[:, best], r[:, best], f1[:, best]
    tp_out = (r * nt).round()
    fp_out = (tp_out / (p + eps) - tp_out).round()
    return tp_out, fp_out, p, r, f1, ap, unique_classes.astype(int)


def _plot_curves(px, pr_curves, p, r, f1, ap, unique_classes, names, save_dir: Path, prefix: str) -> None:
    """Write PR, F1, P and R curves for the classes present in the labels."""
    from utils import plots  # local import: plots imports smooth() from this module

    all_names = names_dict(names)
    present = [all_names.get(int(c), str(int(c))) for c in unique_classes]
    save_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_pr_curve(px, pr_curves, ap, save_dir / f"{prefix}PR_curve.png", present)
    plots.plot_mc_curve(px, f1, save_dir / f"{prefix}F1_curve.png", present, ylabel="F1")
    plots.plot_mc_curve(px, p, save_dir / f"{prefix}P_curve.png", present, ylabel="Precision")
    plots.plot_mc_curve(px, r, save_dir / f"{prefix}R_curve.png", present, ylabel="Recall")


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

    def plot(self, save_dir: Path | str = Path("."), names: Names = (), normalize: bool = True) -> Path:
        """Write confusion_matrix.png into save_dir and return its path."""
        from utils.plots import plot_confusion_matrix

        lookup = names_dict(names)
        labels = [lookup.get(i, str(i)) for i in range(self.nc)]
        return plot_confusion_matrix(self.matrix, labels, Path(save_dir) / "confusion_matrix.png", normalize=normalize)


def _as_numpy(x) -> np.ndarray:
    """Tensor or array-like -> numpy array on the CPU."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class DetectionMetrics:
    """Accumulates per-image matching results during validation and reduces them to P, R, mAP50 and mAP50-95."""

    def __init__(self, nc: int, iouv: torch.Tensor | None = None) -> None:
        self.nc = nc
        self.iouv = default_iouv() if iouv is None else iouv.detach().cpu()
        self.stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, correct, conf, pred_cls, target_cls) -> None:
        """Store one image's (n, t) correctness, (n,) confidences, (n,) predicted classes and (m,) label classes."""
        correct = _as_numpy(correct).astype(bool).reshape(-1, self.iouv.numel())
        self.stats.append((correct, _as_numpy(conf).reshape(-1), _as_numpy(pred_cls).reshape(-1), _as_numpy(target_cls).reshape(-1)))

    def process(self, detections: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Match one image's detections (n, 6) to labels (m, 5) [cls, xyxy], store the result and return the (n, t) matrix."""
        correct = match_predictions(detections, labels, self.iouv.to(detections.device))
        self.update(correct, detections[:, 4], detections[:, 5], labels[:, 0])
        return correct

    def compute(self, plot: bool = False, save_dir: Path = Path("."), names: Names = ()) -> dict[str, object]:
        """Reduce the stored stats to mean P, R, mAP50, mAP50-95 plus per-class arrays (keys ap_class, p, r, f1, ap50, ap, nt)."""
        nt = np.zeros(self.nc, dtype=np.int64)
        out: dict[str, object] = {"mp": 0.0, "mr": 0.0, "map50": 0.0, "map": 0.0, "nt": nt, "ap_class": np.zeros(0, dtype=int),
                                  "p": np.zeros(0), "r": np.zeros(0), "f1": np.zeros(0), "ap50": np.zeros(0), "ap": np.zeros(0)}
        if not self.stats:
            return out
        correct, conf, pred_cls, target_cls = (np.concatenate(parts, 0) for parts in zip(*self.stats))
        if target_cls.size:
            nt[:] = np.bincount(target_cls.astype(int), minlength=self.nc)[: self.nc]
        if not target_cls.size:
            return out
        _, _, p, r, f1, ap, ap_class = ap_per_class(correct, conf, pred_cls, target_cls, plot=plot, save_dir=save_dir, names=names)
        ap50, ap_mean = ap[:, 0], ap.mean(1)
        out.update(mp=float(p.mean()), mr=float(r.mean()), map50=float(ap50.mean()), map=float(ap_mean.mean()),
                   ap_class=ap_class, p=p, r=r, f1=f1, ap50=ap50, ap=ap_mean)
        return out

    def reset(self) -> None:
        """Forget all stored images."""
        self.stats.clear()
