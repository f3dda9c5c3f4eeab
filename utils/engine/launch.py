"""What train.py and segment/train.py run: resolve the options, join DDP when under torchrun, then train or evolve.

The scripts stay thin entry points (no script imports another); the task (utils.tasks registry name) is an option.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from utils.device import select_device
from utils.engine.callbacks import Callbacks
from utils.engine.config import TrainConfig
from utils.engine.evolve import evolve
from utils.engine.options import check_launch_flags, check_options, device_ids, resume_options
from utils.engine.trainer import DistInfo, Trainer
from utils.logs import set_logging
from utils.paths import increment_path
from utils.tasks import get_task


def local_world_size(dist: DistInfo) -> int:
    """How many of the DDP processes run on this machine (torchrun's LOCAL_WORLD_SIZE; all of them when unset)."""
    value = os.getenv("LOCAL_WORLD_SIZE", "")
    return int(value) if dist.local_rank != -1 and value.isdigit() and int(value) > 0 else dist.world_size


def init_distributed(opt: TrainConfig, dist: DistInfo) -> torch.device:
    """Device for this process; under torchrun, joins the process group (NCCL on GPU, gloo on CPU). Local rank i uses
    the i-th GPU --device lists (all visible GPUs when it lists none); check_launch_flags has checked there is one."""
    if dist.local_rank == -1:
        return select_device(opt.device)
    check_launch_flags(opt, dist.world_size, local_world_size(dist))  # callers that skipped resolve_options
    use_cuda = torch.cuda.is_available() and str(opt.device).strip().lower() != "cpu"
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", (device_ids(opt.device) or list(range(torch.cuda.device_count())))[dist.local_rank])
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def resolve_options(opt: TrainConfig | argparse.Namespace, dist: DistInfo) -> TrainConfig:
    """The one place options are resolved, before anything runs: checks, the task's own resolution, resume, the default
    model of the task, the run folder and --batch-size -1 (autobatch)."""
    config = TrainConfig.of(opt)
    check_options(config, dist.world_size, local_world_size(dist))  # every rank refuses alike, before any joins DDP
    config = get_task(config.task).resolve_train_options(config)
    if config.resume:
        config = resume_options(config)
        check_launch_flags(config, dist.world_size, local_world_size(dist))  # the resumed run's --device and --sync-bn
    else:
        cfg = config.cfg or ("" if config.weights else get_task(config.task).default_cfg)
        project = Path(config.project).parent / "evolve" if config.evolve else Path(config.project)  # runs/train -> runs/evolve
        save_dir = str(increment_path(project / config.name, exist_ok=config.exist_ok).resolve())  # resume finds it from any cwd
        config = config.replace(cfg=cfg, save_dir=save_dir)
    if config.batch_size == -1:
        from utils.engine.torch_utils import auto_batch_size

        config = config.replace(batch_size=auto_batch_size(config))
    return config


def train_main(opt: TrainConfig | argparse.Namespace, callbacks: Callbacks | None = None, dist: DistInfo | None = None) -> Path:
    """Resolve options, then train with the Trainer (returns the best, else last, checkpoint) or evolve (hyp_evolve.yaml)."""
    dist = dist or DistInfo.from_env()
    set_logging(rank=dist.rank)
    config = resolve_options(opt, dist)
    device = init_distributed(config, dist)
    if config.evolve:
        return evolve(config, device, callbacks)
    try:
        return Trainer(config, device, dist, callbacks).fit()
    finally:
        if dist.local_rank != -1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
