"""Stop training when fitness has not improved for `patience` epochs."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("mobile_yolo")


class EarlyStopping:
    """YOLOv5-style patience counter on the fitness value."""

    def __init__(self, patience: int = 30) -> None:
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience if patience > 0 else float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fitness: float) -> bool:
        """Record this epoch's fitness; True when training should stop."""
        if fitness >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= self.patience - 1
        stop = delta >= self.patience
        if stop:
            LOGGER.info(
                f"Stopping training early: no improvement in the last {self.patience} epochs; best was epoch {self.best_epoch + 1}. "
                "Use --patience 0 to disable early stopping."
            )
        return stop
