"""Classify images, folders, videos or streams: python classify/predict.py --weights best.pt (data/images default).

Each annotated copy lists the top-5 classes; --save-txt writes them as 'probability name' lines (YOLOv5's layout).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "classify":
    sys.path[0] = str(ROOT)  # `python classify/predict.py`: import the repository's packages, not this folder's scripts
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
from typing import Any

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.inference.classify import run as _run
from utils.inference.predict import parse_predict_args
from utils.logs import set_logging


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's classify/predict.py flags."""
    return parse_predict_args("classify", argv)


def run(**kwargs: Any) -> Path:
    """Python entry point: run(weights='best.pt', source='data/images'); returns the run folder (runs/predict-cls/exp*)."""
    kwargs.setdefault("project", ROOT / "runs/predict-cls")
    return _run(**kwargs)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    with error_boundary("classify/predict"):
        run(**vars(opt))


if __name__ == "__main__":
    main()
