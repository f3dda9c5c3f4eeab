"""What train.py and segment/train.py run: resolve the options, join DDP when under torchrun, then train or evolve.

Both scripts stay thin entry points (no script imports another); the task ("detect" or "segment") is an option.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from utils.device import select_device
from utils.engine.callbacks import Callbacks
from utils.engine.evolve import evolve
from utils.engine.options import DEFAULT_CFGS, check_options, resume_options
from utils.engine.trainer import DistInfo, Trainer, TrainError
from utils.logs import set_logging
from utils.paths import increment_path


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


def train_main(opt: argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Resolve options, then train with the Trainer (returns the best, else last, checkpoint) or evolve (hyp_evolve.yaml)."""
    dist = dist or DistInfo.from_env()
    set_logging(rank=dist.rank)
    check_options(opt, dist.world_size)
    if opt.resume:
        opt = resume_options(opt)
    else:
        opt.cfg = opt.cfg or ("" if opt.weights else DEFAULT_CFGS[opt.task])
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
