"""Compare detectors trained with one recipe: size, accuracy, ONNX Runtime latency (float32 and INT8), Pareto front.

Usage:
    python study.py --cfg models/yolov5n.yaml models/yolov5n_mobilenetv4_conv_small.yaml --epochs 100 --img 320
    python study.py --cfg models/yolov8n_mobileone_s0.yaml --peers yolov8n yolo26n --img 320   # + rows trained by ultralytics

Each model trains into <project>/<name>/<config stem>/ with its head's default hyperparameters and the same epochs,
image size, batch, data and seed; a rerun skips finished models and resumes interrupted ones. Results: study.md,
study.csv and study.png (mAP50-95 against float latency with the Pareto front) in <project>/<name>/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from utils.cli import error_boundary
from utils.logs import set_logging
from utils.study.peers import PEERS
from utils.study.pipeline import StudyOptions, run_study

__all__ = ["main", "parse_opt", "run"]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (YOLOv5 names where train.py has them)."""
    d = StudyOptions()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cfg", nargs="+", required=True, help="model configs (yaml) to compare")
    p.add_argument("--data", default=d.data, help="dataset yaml (default: the shapes dataset, generated on first use)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=d.imgsz, help="train, val, export and timing size (pixels)")
    p.add_argument("--time-img", dest="time_imgsz", type=int, default=d.time_imgsz,
                   help="also export at this size and time those files (e.g. train at --img 320, time at 640); 0 = --img")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training (and validation) batch size")
    p.add_argument("--project", default=d.project, help="studies go to PROJECT/NAME")
    p.add_argument("--name", default=d.name, help="the study's folder: a rerun with the same name continues it")
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads for the timing (0 = all cores)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved timing rounds")
    p.add_argument("--block", type=int, default=d.block, help="timed runs per file per round")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs before each block")
    p.add_argument("--peers", nargs="*", default=[], choices=PEERS, help="also train these with ultralytics (requirements-peers.txt)")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 ONNX exports")
    p.add_argument("--device", default=d.device, help="training device: cuda index like 0, or cpu")
    p.add_argument("--workers", type=int, default=d.workers, help="max dataloader workers")
    p.add_argument("--seed", type=int, default=d.seed)
    return p.parse_args(argv)


def run(**kwargs: Any) -> Path:
    """Python entry point: study.run(cfg=['models/yolov5n.yaml'], epochs=3, imgsz=320); returns study.md."""
    return run_study(**kwargs)


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point: expected problems end in one 'study: error: ...' line."""
    opt = parse_opt(argv)
    set_logging()
    md = Path()
    with error_boundary("study"):
        md = run(**vars(opt))
    return md


if __name__ == "__main__":
    main()
