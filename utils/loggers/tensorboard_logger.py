"""TensorBoard: each results.csv row as scalars, the parameters as text tables and the run's plots as images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from utils.cli import shell_command
from utils.loggers.base import RunLogger

LOGGER = logging.getLogger("mobile_yolo")


def markdown_table(values: dict[str, Any]) -> str:
    """A two-column markdown table (TensorBoard's text dashboard renders it)."""
    rows = [f"| {key} | {str(value).replace('|', '/')} |" for key, value in values.items()]
    return "\n".join(["| key | value |", "| --- | --- |", *rows])


class TensorBoardLogger(RunLogger):
    """Writes event files into the run folder (torch.utils.tensorboard, which needs the tensorboard package)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.step = 0  # the last epoch logged: the step the final plots are shown at
        LOGGER.info(f"TensorBoard: view with {shell_command('tensorboard', '--logdir', log_dir.parent)}")

    def log_params(self, params: dict[str, dict[str, Any]]) -> None:
        """One text table per group (hyp, opt)."""
        for group, values in params.items():
            self.writer.add_text(group, markdown_table(values), 0)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One scalar per results.csv column, the epoch as step; flushed so a running TensorBoard sees it."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()
        self.step = epoch

    def log_plots(self, files: Sequence[Path]) -> None:
        """Each plot as an image, tagged plots/<file stem>."""
        import numpy as np
        from PIL import Image

        for path in files:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", pixels, self.step, dataformats="HWC")

    def log_model(self, path: Path) -> None:
        """TensorBoard keeps no files: the checkpoint's path as text."""
        self.writer.add_text("weights", str(path), self.step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
