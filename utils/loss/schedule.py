"""The epoch hook of the loss contract, for losses that stay the same all training."""

from __future__ import annotations


class FixedOverTraining:
    """Mixin: `start_epoch` (which the Trainer calls before each epoch) has nothing to change."""

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """No schedule: the loss is the same every epoch."""
