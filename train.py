"""Train a detector: python train.py --cfg models/yolov5_mobilenetv4.yaml (embedded shapes dataset by default)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.engine.callbacks import Callbacks
from utils.engine.launch import init_distributed, train_main
from utils.engine.options import resume_options, train_options, train_parser
from utils.engine.torch_utils import NonFiniteLossError
from utils.engine.trainer import DistInfo

__all__ = ["cli", "init_distributed", "main", "parse_opt", "resume_options", "run"]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's train.py flags (plus --backbone-weights and --close-mosaic)."""
    return train_parser("detect").parse_args(argv)


def main(opt: argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Train with the Trainer (returns the best, else last, checkpoint) or evolve (hyp_evolve.yaml)."""
    return train_main(opt, callbacks, dist)


def run(callbacks: Callbacks | None = None, **kwargs: Any) -> Path:
    """Python entry point: train.run(cfg='models/yolov5_mobilenetv4.yaml', epochs=3, imgsz=320); returns best.pt."""
    return main(train_options("detect", **kwargs), callbacks)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: every expected failure ends in one 'train: error: ...' line."""
    with error_boundary("train", extra=(NonFiniteLossError,)):
        main(parse_opt(argv))


if __name__ == "__main__":
    cli()
