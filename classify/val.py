"""Validate a classifier (top-1 / top-5 accuracy): python classify/val.py --weights best.pt --data data/shapes-cls.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "classify":
    sys.path[0] = str(ROOT)  # `python classify/val.py`: import the repository's packages, not this folder's scripts
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
from typing import Any

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.engine.validation import run as _run
from utils.engine.validation import val_main, val_parser
from utils.logs import set_logging


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's classify/val.py flags (val.py's, with the classifier defaults)."""
    return val_parser("classify").parse_args(argv)


def run(**kwargs: Any) -> Any:
    """Python entry point: ((top1, top5, loss), per-class top-1, speed)."""
    kwargs.setdefault("data", str(ROOT / "data" / "shapes-cls.yaml"))
    kwargs.setdefault("project", str(ROOT / "runs/val-cls"))
    kwargs.setdefault("imgsz", 96)
    kwargs.setdefault("script_task", "classify")  # detection weights are refused, naming val.py
    return _run(**kwargs)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    with error_boundary("classify/val"):
        val_main(opt)


if __name__ == "__main__":
    main()
