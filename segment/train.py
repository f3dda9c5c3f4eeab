"""Train a segmentation model: python segment/train.py (MobileNetV4 Segment config on the embedded shapes-seg dataset)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "segment":
    sys.path[0] = str(ROOT)  # `python segment/train.py`: import the repository's packages, not this folder's scripts
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
from typing import Any

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.engine.callbacks import Callbacks
from utils.engine.launch import train_main
from utils.engine.options import train_options, train_parser
from utils.engine.torch_utils import NonFiniteLossError
from utils.engine.trainer import DistInfo


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's segment/train.py flags: train.py's plus --mask-ratio and --no-overlap."""
    return train_parser("segment").parse_args(argv)


def main(opt: argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Train (returns the best, else last, checkpoint) or evolve."""
    return train_main(opt, callbacks, dist)


def run(callbacks: Callbacks | None = None, **kwargs: Any) -> Path:
    """Python entry point: run(cfg='models/yolov5_mobilenetv4-seg.yaml', epochs=3, imgsz=320); returns best.pt."""
    return main(train_options("segment", **kwargs), callbacks)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: every expected failure ends in one 'segment/train: error: ...' line."""
    with error_boundary("segment/train", extra=(NonFiniteLossError,)):
        main(parse_opt(argv))


if __name__ == "__main__":
    cli()
