"""End-to-end head loss: the anchor-free loss on both branches, one-to-many with top-10 and one-to-one with top-1
task-aligned assignment, weighted by YOLO26's schedule that hands the weight to the one-to-one branch over training."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from models.heads.end2end import End2EndOutput
from utils.loss.anchor_free import AnchorFreeLoss

ONE2MANY_START, ONE2MANY_END = 0.8, 0.1  # YOLO26: the one-to-many weight at the first and at the last epoch


def one2many_weight(epoch: int, epochs: int) -> float:
    """The one-to-many branch's loss weight at `epoch` (0-based) of `epochs`: linear from 0.8 to 0.1; one-to-one gets the rest."""
    if epochs <= 1:
        return ONE2MANY_END
    share = min(max(epoch / (epochs - 1), 0.0), 1.0)
    return ONE2MANY_START + (ONE2MANY_END - ONE2MANY_START) * share


class End2EndLoss:
    """Callable loss of the end-to-end head: (End2EndOutput, targets) -> (weighted loss * batch size, detached items)."""

    names: tuple[str, ...] = AnchorFreeLoss.names

    def __init__(self, model: nn.Module, hyp: Mapping[str, float]) -> None:
        self.one2many = AnchorFreeLoss(model, hyp, topk=10)
        self.one2one = AnchorFreeLoss(model, hyp, topk=1)
        self.weight = ONE2MANY_START  # before start_epoch is called (a loss built outside the Trainer)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Move the branch weights along the schedule (the Trainer calls this before each epoch, resumed runs too)."""
        self.weight = one2many_weight(epoch, epochs)

    def __call__(self, preds: End2EndOutput, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight * one-to-many + (1 - weight) * one-to-one, loss and items alike; a fused head's has one-to-one only."""
        if not isinstance(preds, End2EndOutput):
            raise TypeError(f"the end-to-end loss takes the head's End2EndOutput, got {type(preds).__name__}")
        loss, items = self.one2one(preds.one2one, targets)
        if not preds.one2many:
            return loss, items
        many_loss, many_items = self.one2many(preds.one2many, targets)
        w = self.weight
        return w * many_loss + (1 - w) * loss, w * many_items + (1 - w) * items
