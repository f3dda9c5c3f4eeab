"""Run a detector on images, folders, globs, videos, list files, webcams or streams: python detect.py --weights best.pt."""

from __future__ import annotations

import argparse

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.inference.predict import check_options, default_source, parse_predict_args, run
from utils.inference.predictor import open_source
from utils.logs import set_logging

__all__ = ["check_options", "default_source", "main", "open_source", "parse_opt", "run"]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's detect.py flags."""
    return parse_predict_args("detect", argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    with error_boundary("detect"):
        run(**vars(opt))


if __name__ == "__main__":
    main()
