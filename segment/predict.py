"""Segment objects in images, folders, videos or streams: python segment/predict.py --weights best.pt (data/images default)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "segment":
    sys.path[0] = str(ROOT)  # `python segment/predict.py`: import the repository's packages, not this folder's scripts
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
from typing import Any

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.inference.predict import parse_predict_args
from utils.inference.predict import run as _run
from utils.logs import set_logging


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's segment/predict.py flags."""
    return parse_predict_args("segment", argv)


def run(**kwargs: Any) -> Path:
    """Python entry point: run(weights='best.pt', source='data/images'); returns the run folder (runs/predict-seg/exp*)."""
    kwargs.setdefault("project", ROOT / "runs/predict-seg")
    kwargs.setdefault("script_task", "segment")  # detection weights are refused, naming detect.py
    return _run(**kwargs)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    with error_boundary("segment/predict"):
        run(**vars(opt))


if __name__ == "__main__":
    main()
