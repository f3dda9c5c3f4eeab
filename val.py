"""Validate a detector on a YOLO-format dataset: python val.py --weights best.pt --data data/shapes.yaml."""

from __future__ import annotations

import argparse

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.engine.validation import check_options, run, study, val_main, val_parser
from utils.logs import set_logging

__all__ = ["check_options", "main", "parse_opt", "run", "study"]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's val.py flags."""
    return val_parser("detect").parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    with error_boundary("val"):
        val_main(opt)


if __name__ == "__main__":
    main()
