"""Optional TensorBoard scalars for train.py: active only when the tensorboard package is installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from utils.cli import shell_command

LOGGER = logging.getLogger("mobile_yolo")


class TensorBoardLogger:
    """Writes each results.csv row as scalars; a no-op when tensorboard is missing."""

    def __init__(self, log_dir: Path, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
            return
        self.writer = SummaryWriter(str(log_dir))
        LOGGER.info(f"TensorBoard: view with {shell_command('tensorboard', '--logdir', log_dir.parent)}")

    def log_epoch(self, epoch: int, values: Sequence[float]) -> None:
        """values: the results.csv row without the epoch column."""
        if self.writer is None:
            return
        for name, value in zip(self.columns[1:], values):
            self.writer.add_scalar(name, float(value), epoch)
        self.writer.flush()
