"""Train a detector: python train.py --cfg models/yolov5_mobilenetv4.yaml (embedded shapes dataset by default)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from utils.cli import error_boundary
from utils.device import select_device
from utils.engine.callbacks import Callbacks
from utils.engine.evolve import evolve
from utils.engine.options import DEFAULT_CFG, check_options, resume_options, train_options, train_parser
from utils.engine.torch_utils import NonFiniteLossError
from utils.engine.trainer import DistInfo, Trainer, TrainError
from utils.logs import set_logging
from utils.paths import increment_path

LOGGER = logging.getLogger("mobile_yolo")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's train.py flags (plus --backbone-weights and --close-mosaic)."""
    return train_parser().parse_args(argv)


def init_distributed(opt: argparse.Namespace, dist: DistInfo) -> torch.device:
    """Device for this process; under torchrun, joins the process group (NCCL on GPU, gloo on CPU)."""
    if dist.local_rank == -1:
        return select_device(opt.device)
    if opt.batch_size % dist.world_size:
        raise TrainError(f"--batch-size {opt.batch_size} must be a multiple of the {dist.world_size} DDP processes")
    use_cuda = torch.cuda.is_available() and opt.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")


def main(opt: argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Resolve options, then train with the Trainer (returns the best, else last, checkpoint) or evolve (hyp_evolve.yaml)."""
    dist = dist or DistInfo.from_env()
    set_logging(rank=dist.rank)
    check_options(opt, dist.world_size)
    if opt.resume:
        opt = resume_options(opt)
    else:
        opt.cfg = opt.cfg or ("" if opt.weights else DEFAULT_CFG)
        project = Path(opt.project).parent / "evolve" if opt.evolve else Path(opt.project)  # runs/train -> runs/evolve
        opt.save_dir = str(increment_path(project / opt.name, exist_ok=opt.exist_ok).resolve())  # resume finds it from any cwd
    if opt.batch_size == -1:
        from utils.engine.torch_utils import auto_batch_size

        opt.batch_size = auto_batch_size(opt)
    device = init_distributed(opt, dist)
    if opt.evolve:
        return evolve(opt, device, callbacks)
    try:
        return Trainer(opt, device, dist, callbacks).fit()
    finally:
        if dist.local_rank != -1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(callbacks: Callbacks | None = None, **kwargs: Any) -> Path:
    """Python entry point: train.run(cfg='models/yolov5_mobilenetv4.yaml', epochs=3, imgsz=320); returns best.pt."""
    return main(train_options(**kwargs), callbacks)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: every expected failure ends in one 'train: error: ...' line."""
    with error_boundary("train", extra=(NonFiniteLossError,)):
        main(parse_opt(argv))


if __name__ == "__main__":
    cli()
