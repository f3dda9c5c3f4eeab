"""Train a classifier: python classify/train.py (MobileNetV4-conv-small classifier on the embedded shapes-cls dataset).

Its best.pt is also a backbone checkpoint: python train.py --backbone-weights runs/train-cls/exp/weights/best.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "classify":
    sys.path[0] = str(ROOT)  # `python classify/train.py`: import the repository's packages, not this folder's scripts
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
    """YOLOv5's classify/train.py flags (--model, --data, --epochs, --imgsz, --lr0, --decay, --label-smoothing ...)."""
    return train_parser("classify").parse_args(argv)


def main(opt: argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Train; returns the best, else last, checkpoint."""
    return train_main(opt, callbacks, dist)


def run(callbacks: Callbacks | None = None, **kwargs: Any) -> Path:
    """Python entry point: run(model='models/mobileone_s0-cls.yaml', epochs=3, imgsz=96); returns best.pt."""
    return main(train_options("classify", **kwargs), callbacks)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: every expected failure ends in one 'classify/train: error: ...' line."""
    with error_boundary("classify/train", extra=(NonFiniteLossError,)):
        main(parse_opt(argv))


if __name__ == "__main__":
    cli()
