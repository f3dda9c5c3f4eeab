"""Export a trained checkpoint (or a random-weight model config) to ONNX, TorchScript, OpenVINO, NCNN, TFLite and Core ML.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript --imgsz 640
    python export.py --cfg models/yolov5n_mobileone_s0.yaml --include onnx --dynamic --simplify
    python export.py --weights best.pt --include onnx openvino --int8 --data data/shapes.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import utils.openmp  # noqa: F401  (first: OpenMP's wait policy is read when torch loads)
from utils.cli import error_boundary
from utils.export.exporter import FORMATS, export_model
from utils.export.formats import export_onnx_model

__all__ = ["export_onnx_model", "main", "parse_opt", "run"]
run = export_model  # YOLOv5's export.run(**kwargs)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (YOLOv5 export.py names)."""
    p = argparse.ArgumentParser(description="Export a detector to ONNX / TorchScript / OpenVINO / NCNN / TFLite / Core ML")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=str, default=None, help="trained .pt checkpoint")
    src.add_argument("--cfg", type=str, default=None, help="model yaml (random weights, for deployability checks)")
    p.add_argument("--include", nargs="+", default=["onnx"], help=f"formats: {', '.join(FORMATS)}")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="image size h [w]")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of static exports")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index like 0")
    p.add_argument("--half", action="store_true", help="FP16 export (CUDA only)")
    p.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch, height and width")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim / onnxsim")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--int8", action="store_true", help="ONNX/OpenVINO/TFLite: static INT8 (needs --data); Core ML: int8 weights")
    p.add_argument("--data", type=str, default=None, help="dataset yaml or image folder for INT8 calibration")
    p.add_argument("--n-calib", type=int, default=300, help="number of INT8 calibration images")
    p.add_argument("--per-tensor", action="store_true", help="INT8: one scale per weight tensor (default: per output channel)")
    p.add_argument("--output", type=str, default=None, help="output path (default: next to the weights)")
    p.add_argument("--nms", action="store_true", help="ONNX/TorchScript/OpenVINO: NMS inside the graph, final (B, topk-all, 6) boxes")
    p.add_argument("--conf-thres", type=float, default=0.25, help="--nms confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.45, help="--nms IoU threshold")
    p.add_argument("--topk-per-class", type=int, default=100, help="--nms boxes kept per class and image")
    p.add_argument("--topk-all", type=int, default=100, help="--nms boxes kept per image (the output's second dimension)")
    p.add_argument("--agnostic-nms", action="store_true", help="--nms across classes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    """CLI entry point: expected problems exit with one 'export: error: ...' line."""
    from utils.logs import set_logging

    set_logging()
    opt = parse_opt(argv)
    files: list[Path] = []
    with error_boundary("export"):  # ExportError, CheckpointError, QuantizeError, DatasetError, OSError, ...
        files = run(**vars(opt))
    return files


if __name__ == "__main__":
    main()
