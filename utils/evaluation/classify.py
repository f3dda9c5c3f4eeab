"""ClassifyEvaluator: top-1 / top-5 accuracy of a classification pass, per class too, with timings and loss.

Like DetectionEvaluator it sees only predictions and labels (update/compute), so the classification task's loop, the
Trainer and tests drive it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

TABLE_HEADER = ("Class", "Images", "top1_acc", "top5_acc")
STAGES = ("preprocess", "inference", "postprocess")


@dataclass(frozen=True, eq=False)
class ClassifyResult:
    """One classification validation pass: YOLOv5's top-1/top-5 accuracy, per-class detail, speed and loss."""

    top1: float
    top5: float
    class_top1: np.ndarray  # (nc,) top-1 accuracy per class (0 for classes without images)
    class_top5: np.ndarray
    instances: np.ndarray  # (nc,) images per class
    seen: int
    speed: tuple[float, float, float]  # ms per image: pre-process, inference, post-process
    loss: tuple[float, ...]  # mean validation loss items, () when no loss was computed
    names: tuple[str, ...]

    @property
    def maps(self) -> np.ndarray:
        """Per-class score in the place of detection's per-class mAP (--image-weights): the top-1 accuracy."""
        return self.class_top1

    def fitness(self) -> float:
        """Top-1 accuracy, YOLOv5's classifier-selection score."""
        return self.top1

    def results_row(self) -> tuple[float, ...]:
        """(top1, top5, *loss): what results.csv records after the training losses."""
        return (self.top1, self.top5, *self.loss)

    def table(self, verbose: bool = False) -> list[str]:
        """Header, the 'all' row and, when verbose, one row per class (YOLOv5's classify/val.py table)."""
        row = "%22s%11s%11.3g%11.3g"
        lines = [("%22s" + "%11s" * 3) % TABLE_HEADER, row % ("all", self.seen, self.top1, self.top5)]
        if verbose:
            for c, name in enumerate(self.names):
                lines.append(row % (name, int(self.instances[c]), self.class_top1[c], self.class_top5[c]))
        return lines


class ClassifyEvaluator:
    """Accumulates (probabilities or logits, labels) batches; compute() -> ClassifyResult."""

    def __init__(self, nc: int, names: Sequence[str] | None = None) -> None:
        self.nc = int(nc)
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(self.nc))
        self.reset()

    def reset(self) -> None:
        """Forget every stored batch, time and loss."""
        self._hits: list[torch.Tensor] = []  # (n, 2) bool: label in top-1, in top-5
        self._labels: list[torch.Tensor] = []
        self._times = dict.fromkeys(STAGES, 0.0)
        self._loss: torch.Tensor | None = None
        self._loss_batches = 0

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: (n, nc) class scores (any monotone form: logits or probabilities) and (n,) true class indices."""
        if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
            shapes = f"{tuple(scores.shape)} and {tuple(labels.shape)}"
            raise ValueError(f"ClassifyEvaluator: scores (n, nc) and labels (n,) must agree, got {shapes}")
        k = min(5, scores.shape[1])
        top = scores.float().topk(k, 1).indices.cpu()
        labels = labels.long().cpu()
        hit = top == labels[:, None]
        self._hits.append(torch.stack((hit[:, 0], hit.any(1)), 1))
        self._labels.append(labels)

    def add_time(self, stage: str, seconds: float) -> None:
        """Wall time spent in one stage (pre-process, inference, post-process)."""
        self._times[stage] = self._times.get(stage, 0.0) + seconds

    def add_loss(self, items: torch.Tensor) -> None:
        """One batch's loss items (averaged over batches in compute)."""
        items = items.detach().float().cpu()
        self._loss = items if self._loss is None else self._loss + items
        self._loss_batches += 1

    def compute(self) -> ClassifyResult:
        """Accuracies over every stored image, overall and per class."""
        hits = torch.cat(self._hits).float().numpy() if self._hits else np.zeros((0, 2))
        labels = torch.cat(self._labels).numpy() if self._labels else np.zeros(0, dtype=np.int64)
        seen = len(labels)
        counts = np.bincount(labels, minlength=self.nc)[: self.nc].astype(np.int64)
        per_class = [np.bincount(labels, weights=hits[:, j], minlength=self.nc)[: self.nc] / np.maximum(counts, 1) for j in (0, 1)]
        top1, top5 = (float(hits[:, j].mean()) if seen else 0.0 for j in (0, 1))
        speed = tuple(self._times.get(s, 0.0) / max(seen, 1) * 1e3 for s in STAGES)
        loss = tuple((self._loss / self._loss_batches).tolist()) if self._loss is not None else ()
        return ClassifyResult(top1, top5, per_class[0], per_class[1], counts, seen, speed, loss, self.names)  # type: ignore[arg-type]
