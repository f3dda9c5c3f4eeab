"""The classification loss: cross-entropy with label smoothing (YOLOv5's classify/train.py), one item named `loss`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from utils.loss.schedule import FixedOverTraining


class ClassifyLoss(FixedOverTraining):
    """(logits (B, nc), labels (B,)) -> (mean cross-entropy, its detached value as the one loss item).

    Validation passes log-probabilities as the logits: log_softmax leaves them unchanged, so the loss is the same.
    """

    names: tuple[str, ...] = ("loss",)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def __call__(self, preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(preds.float(), targets.long().to(preds.device), label_smoothing=self.label_smoothing)
        return loss, loss.detach().view(1)
