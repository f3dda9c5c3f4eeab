"""python -m utils.convert yolov5s.pt [--out DIR_OR_FILE]: write this project's checkpoint of a YOLOv5 / YOLOv8 file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from utils.checkpoint import read_checkpoint
from utils.cli import error_boundary, shell_command
from utils.convert.converter import SUFFIX, convert_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: the source file and an optional --out."""
    parser = argparse.ArgumentParser(
        prog="convert", description="Convert a YOLOv5 (detection, segmentation) or ultralytics YOLOv8 (detection) checkpoint "
        "into this project's checkpoint. Nothing stored in the file is executed: only tensors, the named module classes "
        "and plain metadata are read.")
    parser.add_argument("weights", help="the YOLOv5 / YOLOv8 .pt file")
    parser.add_argument("--out", default=None, help=f"output file or folder (default: <name>{SUFFIX}.pt beside the source)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Convert and print the output path with the commands that use it; failures end in one 'convert: error: ...' line."""
    opt = parse_args(argv)
    with error_boundary("convert"):
        out = convert_checkpoint(opt.weights, opt.out)
        segment = read_checkpoint(out)["cfg"]["head"][-1][2] == "Segment"
    script, trainer = ("segment/predict.py", "segment/train.py") if segment else ("detect.py", "train.py")
    print(f"wrote {out}; use it with {shell_command('python', script, '--weights', out)} (or {trainer} / val.py --weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
