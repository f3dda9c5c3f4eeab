"""DetectionEvaluator: per-batch matching, confusion counts, timings and losses of a validation pass -> DetectionResult.

The evaluator sees detections and labels in one pixel space and knows nothing about models, loaders or files, so the
validation loops (utils.tasks), the trainer and tests all drive it the same way. A task that scores a second
kind of match (masks) adds its own MatchStats and feeds it a `correct` matrix from metrics.match_from_iou.
SegmentEvaluator does that for instance masks (mask IoU in place of box IoU) and returns a SegmentResult.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from utils.evaluation.masks import mask_iou
from utils.evaluation.metrics import ConfusionMatrix, Curves, class_ap_stats, default_iouv, match_from_iou, match_predictions

STAGES = ("preprocess", "inference", "nms")
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
_ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4
SEG_TABLE_HEADER = ("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)", "Mask(P", "R", "mAP50", "mAP50-95)")
_SEG_ROW = "%22s" + "%11i" * 2 + "%11.3g" * 8
SEG_FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9, 0.0, 0.0, 0.1, 0.9)  # YOLOv5-seg: over (P, R, mAP50, mAP50-95) of boxes then masks


@dataclass(frozen=True, eq=False)
class PerClass:
    """Metrics of each class present in the labels; entry i belongs to class ap_class[i]."""

    ap_class: np.ndarray  # (k,) int class indices
    p: np.ndarray  # (k,) precision at the best mean-F1 confidence
    r: np.ndarray  # (k,) recall at that confidence
    f1: np.ndarray  # (k,)
    ap50: np.ndarray  # (k,) AP at IoU 0.5
    ap: np.ndarray  # (k,) AP averaged over the IoU thresholds (0.5:0.95)

    @classmethod
    def empty(cls) -> PerClass:
        """No class scored (no labels, or not one correct detection)."""
        return cls(np.zeros(0, dtype=int), *(np.zeros(0) for _ in range(5)))


@dataclass(frozen=True, eq=False)
class MatchSummary:
    """Mean P, R, mAP50, mAP50-95 of one kind of match (boxes here; masks for a segmentation evaluator) with its detail."""

    precision: float
    recall: float
    map50: float
    map: float
    per_class: PerClass
    maps: np.ndarray  # (nc,) mAP50-95 per class, the mean for classes without a score
    curves: Curves | None


class MatchStats:
    """Accumulates one kind of match per image: (n, t) correctness, confidences, predicted and true classes."""

    def __init__(self, niou: int) -> None:
        self.niou = niou
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, correct: torch.Tensor, conf: torch.Tensor, pred_cls: torch.Tensor, target_cls: torch.Tensor) -> None:
        """Store one image's (n, t) correctness, (n,) confidences, (n,) predicted classes and (m,) label classes."""
        def arr(x: torch.Tensor) -> np.ndarray:
            return x.detach().cpu().numpy().reshape(-1)

        flags = correct.detach().cpu().numpy().astype(bool).reshape(-1, self.niou)
        self._parts.append((flags, arr(conf).astype(np.float64), arr(pred_cls).astype(np.float64), arr(target_cls).astype(np.float64)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Everything stored so far, concatenated: (N, t) correct, (N,) conf, (N,) pred_cls, (M,) target_cls."""
        if not self._parts:
            return np.zeros((0, self.niou), dtype=bool), np.zeros(0), np.zeros(0), np.zeros(0)
        correct, conf, pred_cls, target_cls = (np.concatenate(parts, 0) for parts in zip(*self._parts))
        return correct, conf, pred_cls, target_cls

    def instances(self, nc: int) -> np.ndarray:
        """(nc,) labels per class."""
        target_cls = self.arrays()[3].astype(int)
        return np.bincount(target_cls[(target_cls >= 0) & (target_cls < nc)], minlength=nc)

    def summarize(self, nc: int) -> MatchSummary:
        """P, R, mAP50, mAP50-95 as YOLOv5 reports them: all zero unless some detection is correct at some IoU."""
        correct, conf, pred_cls, target_cls = self.arrays()
        if not correct.any():
            return MatchSummary(0.0, 0.0, 0.0, 0.0, PerClass.empty(), np.zeros(nc), None)
        s = class_ap_stats(correct, conf, pred_cls, target_cls)
        ap50, ap = s.ap[:, 0], s.ap.mean(1)
        mean_ap = float(ap.mean())
        maps = np.full(nc, mean_ap)
        known = s.classes < nc
        maps[s.classes[known]] = ap[known]
        per_class = PerClass(ap_class=s.classes, p=s.p, r=s.r, f1=s.f1, ap50=ap50, ap=ap)
        return MatchSummary(float(s.p.mean()), float(s.r.mean()), float(ap50.mean()), mean_ap, per_class, maps, s.curves)

    def reset(self) -> None:
        """Forget every stored image."""
        self._parts.clear()


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """The outcome of one validation pass: YOLOv5's metrics, per-class detail, confusion counts, speed and loss."""

    precision: float
    recall: float
    map50: float
    map: float  # mAP50-95
    per_class: PerClass
    instances: np.ndarray  # (nc,) labels per class
    maps: np.ndarray  # (nc,) mAP50-95 per class, the mean for classes without a score
    confusion: np.ndarray  # (nc+1, nc+1) counts, row = predicted, column = true, last = background
    seen: int  # images
    speed: tuple[float, float, float]  # ms per image: pre-process, inference, NMS
    loss: tuple[float, ...]  # mean validation loss items, () when no loss was computed
    curves: Curves | None  # PR/F1/P/R curve data, None when nothing was correct
    names: tuple[str, ...]

    def fitness(self) -> float:
        """0.1 * mAP50 + 0.9 * mAP50-95, YOLOv5's model-selection score."""
        return 0.1 * self.map50 + 0.9 * self.map

    def results_row(self) -> tuple[float, ...]:
        """(P, R, mAP50, mAP50-95, *loss): the tuple YOLOv5's val.run returned and results.csv records."""
        return (self.precision, self.recall, self.map50, self.map, *self.loss)

    def table(self, verbose: bool = False) -> list[str]:
        """The printed results table: header, the 'all' row and, when verbose with several classes, one row per class."""
        lines = [("%22s" + "%11s" * 6) % TABLE_HEADER]
        lines.append(_ROW % ("all", self.seen, self.instances.sum(), self.precision, self.recall, self.map50, self.map))
        if verbose and len(self.names) > 1:
            pc = self.per_class
            for i, c in enumerate(pc.ap_class.tolist()):
                name = self.names[c] if 0 <= c < len(self.names) else str(c)
                count = self.instances[c] if 0 <= c < len(self.instances) else 0
                lines.append(_ROW % (name, self.seen, count, pc.p[i], pc.r[i], pc.ap50[i], pc.ap[i]))
        return lines


def _class_metrics(pc: PerClass, c: int) -> tuple[float, float, float, float]:
    """(P, R, mAP50, mAP50-95) of class c, zeros when it was not scored."""
    hit = np.flatnonzero(pc.ap_class == c)
    if not hit.size:
        return 0.0, 0.0, 0.0, 0.0
    i = int(hit[0])
    return float(pc.p[i]), float(pc.r[i]), float(pc.ap50[i]), float(pc.ap[i])


@dataclass(frozen=True, eq=False)
class SegmentResult(DetectionResult):
    """A segmentation validation pass: the inherited metrics are the boxes', `mask` the masks'; `maps` is box + mask per class."""

    mask: MatchSummary

    @classmethod
    def combine(cls, box: DetectionResult, mask: MatchSummary) -> SegmentResult:
        """The box result with the mask summary added and `maps` summed per class (YOLOv5-seg's class weights source)."""
        parts = {f.name: getattr(box, f.name) for f in fields(box)}
        parts["maps"] = box.maps + mask.maps
        return cls(**parts, mask=mask)

    def metrics(self) -> tuple[float, ...]:
        """(P, R, mAP50, mAP50-95) of boxes, then of masks."""
        m = self.mask
        return (self.precision, self.recall, self.map50, self.map, m.precision, m.recall, m.map50, m.map)

    def fitness(self) -> float:
        """YOLOv5-seg's model-selection score: 0.1 * mAP50 + 0.9 * mAP50-95 of boxes plus the same of masks."""
        return float(sum(w * v for w, v in zip(SEG_FITNESS_WEIGHTS, self.metrics())))

    def results_row(self) -> tuple[float, ...]:
        """(P(B), R(B), mAP50(B), mAP50-95(B), P(M), R(M), mAP50(M), mAP50-95(M), *loss): YOLOv5-seg's results.csv values."""
        return (*self.metrics(), *self.loss)

    def table(self, verbose: bool = False) -> list[str]:
        """YOLOv5-seg's printed table: header, the 'all' row and, when verbose with several classes, one row per class."""
        lines = [("%22s" + "%11s" * 10) % SEG_TABLE_HEADER]
        lines.append(_SEG_ROW % ("all", self.seen, self.instances.sum(), *self.metrics()))
        if verbose and len(self.names) > 1:
            for c in np.union1d(self.per_class.ap_class, self.mask.per_class.ap_class).astype(int).tolist():
                name = self.names[c] if 0 <= c < len(self.names) else str(c)
                count = self.instances[c] if 0 <= c < len(self.instances) else 0
                row = (*_class_metrics(self.per_class, c), *_class_metrics(self.mask.per_class, c))
                lines.append(_SEG_ROW % (name, self.seen, count, *row))
        return lines


class DetectionEvaluator:
    """Accumulates a validation pass batch by batch; compute() turns it into a DetectionResult."""

    def __init__(
        self,
        nc: int,
        names: Sequence[str] | None = None,
        iouv: torch.Tensor | None = None,
        conf_cm: float = 0.25,
        iou_cm: float = 0.45,
        single_cls: bool = False,
    ) -> None:
        self.nc = int(nc)
        self.names = tuple(str(n) for n in names) if names is not None else tuple(str(i) for i in range(self.nc))
        self.iouv = default_iouv() if iouv is None else iouv.detach().float().cpu()
        self.conf_cm, self.iou_cm, self.single_cls = conf_cm, iou_cm, single_cls
        self.reset()

    def reset(self) -> None:
        """Start a new pass: no images, matches, confusion counts, timings or losses."""
        self.box = MatchStats(self.iouv.numel())
        self.confusion = ConfusionMatrix(self.nc, conf=self.conf_cm, iou_thres=self.iou_cm)
        self.seen = 0
        self.times = dict.fromkeys(STAGES, 0.0)
        self._loss_sum: torch.Tensor | None = None
        self._loss_batches = 0

    def update(self, predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        """Add one batch: per image (n, 6+) [x1, y1, x2, y2, conf, cls, ...] detections and (m, 5) [cls, x1, y1, x2, y2] labels."""
        if len(predictions) != len(targets):
            raise ValueError(f"DetectionEvaluator.update: {len(predictions)} prediction tensors but {len(targets)} label tensors")
        for pred, labels in zip(predictions, targets):
            self.add_prepared(*self.prepare(pred, labels))

    def add_prepared(self, det: torch.Tensor, lab: torch.Tensor) -> None:
        """Add one image's box matches and confusion counts from its prepared (n, 6) detections and (m, 5) labels."""
        self.box.add(self.match_boxes(det, lab), det[:, 4], det[:, 5], lab[:, 0])
        self.confusion.process_batch(det, lab)
        self.seen += 1

    def prepare(self, pred: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (n, 6) float CPU detections (extra columns dropped) and (m, 5) labels, classes merged when single_cls."""
        det, lab = pred.detach().float().cpu(), labels.detach().float().cpu()
        if det.ndim != 2 or (det.numel() and det.shape[1] < 6):
            raise ValueError(f"DetectionEvaluator.update: detections must be (n, 6+) [x1, y1, x2, y2, conf, cls], got {tuple(det.shape)}")
        if (lab.ndim != 2 or lab.shape[1] != 5) and lab.numel():
            raise ValueError(f"DetectionEvaluator.update: labels must be (m, 5) [cls, x1, y1, x2, y2], got {tuple(lab.shape)}")
        det = det[:, :6].clone() if det.numel() else det.new_zeros((0, 6))
        lab = lab.reshape(-1, 5).clone()
        if self.single_cls:
            det[:, 5] = 0
            lab[:, 0] = 0
        return det, lab

    def match_boxes(self, det: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(n, t) correctness of the detections against the labels at each IoU threshold (box IoU, same class)."""
        return match_predictions(det, labels, self.iouv)

    def add_time(self, stage: str, seconds: float) -> None:
        """Add wall time to one of STAGES ('preprocess', 'inference', 'nms'); compute() reports ms per image."""
        if stage not in self.times:
            raise ValueError(f"DetectionEvaluator.add_time: unknown stage {stage!r}, expected one of {STAGES}")
        self.times[stage] += float(seconds)

    def add_loss(self, items: torch.Tensor) -> None:
        """Add one batch's validation loss items; compute() reports their mean over the batches added."""
        items = items.detach().float().cpu().reshape(-1)
        self._loss_sum = items.clone() if self._loss_sum is None else self._loss_sum + items
        self._loss_batches += 1

    def speed(self) -> tuple[float, float, float]:
        """Milliseconds per image for pre-process, inference and NMS."""
        pre, inf, nms = (self.times[s] / max(self.seen, 1) * 1e3 for s in STAGES)
        return pre, inf, nms

    def mean_loss(self) -> tuple[float, ...]:
        """Mean loss items over the batches added, () when none were."""
        if self._loss_sum is None:
            return ()
        return tuple((self._loss_sum / self._loss_batches).tolist())

    def compute(self) -> DetectionResult:
        """Reduce everything accumulated so far (the evaluator keeps its state; reset() starts over)."""
        box = self.box.summarize(self.nc)
        return DetectionResult(
            precision=box.precision, recall=box.recall, map50=box.map50, map=box.map, per_class=box.per_class,
            instances=self.box.instances(self.nc), maps=box.maps, confusion=self.confusion.matrix.copy(), seen=self.seen,
            speed=self.speed(), loss=self.mean_loss(), curves=box.curves, names=self.names,
        )


class SegmentEvaluator(DetectionEvaluator):
    """DetectionEvaluator that also scores instance masks (`self.mask`); compute() returns a SegmentResult."""

    def reset(self) -> None:
        """Start a new pass (box and mask matches, confusion counts, timings, losses)."""
        super().reset()
        self.mask = MatchStats(self.iouv.numel())

    def update(
        self,
        predictions: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        pred_masks: Sequence[torch.Tensor] | None = None,
        gt_masks: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Add one batch: per image detections and labels as DetectionEvaluator takes them, (n, h, w) and (m, h, w) binary masks."""
        if pred_masks is None or gt_masks is None:
            raise ValueError("SegmentEvaluator.update: needs pred_masks and gt_masks, one (n, h, w) / (m, h, w) tensor per image")
        if not len(predictions) == len(targets) == len(pred_masks) == len(gt_masks):
            raise ValueError(
                f"SegmentEvaluator.update: {len(predictions)} prediction, {len(targets)} label, {len(pred_masks)} predicted-mask "
                f"and {len(gt_masks)} label-mask tensors"
            )
        prepared = [self.prepare(pred, labels) for pred, labels in zip(predictions, targets)]
        correct = [self.match_masks(det, lab, pm, gm) for (det, lab), pm, gm in zip(prepared, pred_masks, gt_masks)]
        for (det, lab), mask_correct in zip(prepared, correct):  # every input checked: nothing is half-added on an error
            self.add_prepared(det, lab)
            self.mask.add(mask_correct, det[:, 4], det[:, 5], lab[:, 0])

    def match_masks(self, det: torch.Tensor, labels: torch.Tensor, pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
        """(n, t) correctness of the detections' masks against the labels' masks at each IoU threshold (mask IoU, same class)."""
        n, m = det.shape[0], labels.shape[0]
        pm, gm = pred_masks.detach().cpu(), gt_masks.detach().cpu()
        if pm.shape[0] != n or gm.shape[0] != m or (n and m and pm.shape[1:] != gm.shape[1:]):
            raise ValueError(
                f"SegmentEvaluator.update: masks {tuple(pm.shape)} / {tuple(gm.shape)} do not fit {n} detections / {m} labels "
                "at one common (h, w)"
            )
        if not n or not m:
            return torch.zeros((n, self.iouv.numel()), dtype=torch.bool)
        iou = mask_iou(gm.reshape(m, -1), pm.reshape(n, -1))
        return match_from_iou(iou, labels[:, 0], det[:, 5], self.iouv, det[:, 4])

    def compute(self) -> SegmentResult:
        """Reduce everything accumulated so far into box and mask metrics (the state is kept; reset() starts over)."""
        return SegmentResult.combine(super().compute(), self.mask.summarize(self.nc))
