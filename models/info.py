"""Command line: print a model's per-layer table and summary (python -m models.info --cfg models/yolov5s.yaml).

Kept apart from models/yolo.py so that running it as __main__ does not register Detect a second time.
"""

from __future__ import annotations

import argparse
import logging

from models.parse import ModelConfigError
from models.yolo import DetectionModel


def main(argv: list[str] | None = None) -> None:
    """Print a model's layer table and summary: python -m models.info --cfg models/yolov5s.yaml."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model yaml")
    parser.add_argument("--imgsz", type=int, default=640, help="image size for the GFLOPs figure")
    parser.add_argument("--verbose", action="store_true", help="print the per-layer table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = DetectionModel(args.cfg)
    except (ModelConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    model.info(verbose=args.verbose, imgsz=args.imgsz)



if __name__ == "__main__":
    main()
