"""Training callbacks: named events the Trainer fires, to which loggers and user code attach (YOLOv5's hook idea)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EVENTS = (
    "on_train_start",  # trainer set up, before the first epoch
    "on_train_batch_end",  # after each optimizer-visible batch: trainer, batch index, images, targets, paths
    "on_train_epoch_end",  # after the training part of an epoch: trainer, epoch, mean losses
    "on_fit_epoch_end",  # after validation and results.csv: trainer, epoch, results row
    "on_model_save",  # a checkpoint was written: trainer, path
    "on_train_end",  # after the final validation: trainer, best checkpoint path
)


class Callbacks:
    """Ordered handlers per event; unknown event names raise ValueError listing the known ones."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable[..., Any]]] = {e: [] for e in EVENTS}

    def register(self, event: str, handler: Callable[..., Any]) -> None:
        """Call `handler(**kwargs)` each time `event` fires."""
        self._check(event)
        self._handlers[event].append(handler)

    def run(self, event: str, **kwargs: Any) -> None:
        """Fire `event`: every handler, in registration order."""
        self._check(event)
        for handler in self._handlers[event]:
            handler(**kwargs)

    def _check(self, event: str) -> None:
        if event not in self._handlers:
            raise ValueError(f"unknown callback event {event!r}; known: {', '.join(EVENTS)}")
