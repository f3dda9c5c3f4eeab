"""Command line: build a model, print its summary (and per-layer table) and run one forward pass.

python -m models.info --cfg models/yolov5s.yaml [--verbose] [--imgsz 640] [--batch-size 1] [--device cpu|0|cuda:0]
`python models/yolo.py --cfg ...` (YOLOv5's command) runs this with the layer table on. Kept apart from models/yolo.py
so that running it as __main__ does not register Detect a second time.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

from models.limits import DEFAULT_MAX_PARAMS, MAX_IMGSZ_ENV, PARAMS_ENV, max_img_size
from models.model import DetectionModel
from models.parse import ModelConfigError

LOGGER = logging.getLogger("mobile_yolo")


def resolve_device(spec: str) -> torch.device:
    """Torch device from YOLOv5-style --device text ("" = first GPU if any else CPU, "cpu", "0", "cuda:0", "mps").

    Models import nothing from utils/ (utils.device does the same for the scripts), hence this small local version.
    """
    text = spec.strip().lower()
    if not text:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected '', 'cpu', a GPU index such as 0, 'cuda:0' or 'mps'") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {spec!r}: no such CUDA device ({torch.cuda.device_count()} available)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec!r}: MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {spec!r}: unsupported device type {device.type!r}")
    return device


def describe_shapes(out: Any) -> str:
    """Shapes of a (nested) model output, e.g. "((1, 252, 85), [(1, 3, 8, 8, 85), ...])", for the forward-pass line."""
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    if isinstance(out, (list, tuple)):
        inner = ", ".join(describe_shapes(o) for o in out)
        return f"[{inner}]" if isinstance(out, list) else f"({inner})"
    return type(out).__name__


def forward_once(model: DetectionModel, batch: int, imgsz: int, device: torch.device) -> str:
    """Run one eval-mode, no-grad forward pass on a zeros batch; returns a line with the timing and the output shapes."""
    model.to(device).eval()
    x = torch.zeros(batch, model.yaml["ch"], imgsz, imgsz, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1000
    return f"forward pass on {device}: input {tuple(x.shape)} -> output {describe_shapes(out)} in {ms:.1f} ms"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's flags (YOLOv5's models/yolo.py names where they exist)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model yaml")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="input size for GFLOPs and the forward pass")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the forward pass")
    parser.add_argument("--device", default="", help="'' (GPU 0 if available, else CPU), cpu, 0 or cuda:0")
    parser.add_argument("--verbose", action="store_true", help="print the per-layer table")
    parser.add_argument("--max-params", type=int, default=None, help=f"model size limit (default {DEFAULT_MAX_PARAMS:,}, or ${PARAMS_ENV})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, layer_table: bool = False) -> int:
    """Build --cfg, print its summary (and layer table with --verbose or layer_table) and run one forward pass; returns 0.

    Every expected failure (bad config, device or size) is one `error: ...` line via SystemExit, never a traceback.
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.batch_size < 1 or args.imgsz < 1:
            raise ValueError(f"--batch-size {args.batch_size} and --imgsz {args.imgsz} must be positive")
        if args.imgsz > max_img_size():
            raise ValueError(f"--imgsz {args.imgsz} exceeds the limit of {max_img_size()} pixels (raise it with {MAX_IMGSZ_ENV})")
        device = resolve_device(args.device)
        model = DetectionModel(args.cfg, max_params=args.max_params)
    except (ModelConfigError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    stride = int(model.stride.max())
    imgsz = math.ceil(args.imgsz / stride) * stride
    if imgsz != args.imgsz:
        LOGGER.info(f"--imgsz {args.imgsz} is not a multiple of the model's largest stride {stride}: using {imgsz}")
    model.info(verbose=args.verbose or layer_table, imgsz=imgsz)
    try:
        line = forward_once(model, args.batch_size, imgsz, device)
    except (RuntimeError, ValueError) as e:  # e.g. CUDA out of memory for a huge batch
        raise SystemExit(f"error: forward pass failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    LOGGER.info(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
