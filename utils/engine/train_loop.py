"""One training epoch (forward, loss, AMP backward, accumulation, EMA) and its per-epoch bookkeeping."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from utils.engine.torch_utils import check_finite_loss, warmup_step

LOGGER = logging.getLogger("mobile_yolo")
NOMINAL_BATCH = 64


@dataclass
class TrainContext:
    """What train_one_epoch needs; built once by train.py."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Any
    compute_loss: Callable
    loader: Any
    device: torch.device
    hyp: dict
    lf: Callable[[float], float]
    batch_size: int
    imgsz: int
    epochs: int
    warmup_iters: int
    multi_scale: bool = False
    gs: int = 32
    rank: int = -1
    last_opt_step: int = -1
    plot_batch: Callable[[int, torch.Tensor, torch.Tensor, list], None] | None = None

    @property
    def accumulate(self) -> int:
        """Optimizer steps every `accumulate` batches so the effective batch is ~64."""
        return max(round(NOMINAL_BATCH / self.batch_size), 1)


def _multi_scale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """Resize the batch to a random size in [0.5, 1.5] x imgsz, a multiple of the stride."""
    size = int(np.random.uniform(imgsz * 0.5, imgsz * 1.5 + gs)) // gs * gs
    factor = size / max(imgs.shape[2:])
    if factor == 1:
        return imgs
    new = [math.ceil(x * factor / gs) * gs for x in imgs.shape[2:]]
    return torch.nn.functional.interpolate(imgs, size=new, mode="bilinear", align_corners=False)


def _optimizer_step(ctx: TrainContext) -> None:
    """Unscale, clip, step, zero and update the EMA."""
    ctx.scaler.unscale_(ctx.optimizer)
    torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm=10.0)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.ema is not None:
        ctx.ema.update(ctx.model)


def train_one_epoch(ctx: TrainContext, epoch: int) -> torch.Tensor:
    """Train for one epoch; returns the mean (box, obj, cls) loss."""
    ctx.model.train()
    nb = len(ctx.loader)
    if hasattr(ctx.loader, "sampler") and hasattr(ctx.loader.sampler, "set_epoch"):
        ctx.loader.sampler.set_epoch(epoch)
    mloss = torch.zeros(3, device=ctx.device)
    amp = ctx.device.type == "cuda"
    header = ("%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")
    if ctx.rank in (-1, 0):
        LOGGER.info(header)
    bar = tqdm(enumerate(ctx.loader), total=nb, disable=ctx.rank not in (-1, 0), bar_format="{l_bar}{bar:10}{r_bar}")
    ctx.optimizer.zero_grad(set_to_none=True)
    for i, (imgs, targets, paths, _) in bar:
        ni = i + nb * epoch
        imgs = imgs.to(ctx.device, non_blocking=True).float() / 255
        if ni <= ctx.warmup_iters:
            warmup_step(ctx.optimizer, ni, ctx.warmup_iters, epoch, ctx.lf, ctx.hyp)
        if ctx.multi_scale:
            imgs = _multi_scale(imgs, ctx.imgsz, ctx.gs)
        with torch.autocast(device_type=ctx.device.type, enabled=amp):
            preds = ctx.model(imgs)
            loss, items = ctx.compute_loss(preds, targets.to(ctx.device))
        if ctx.rank != -1:
            loss = loss * torch.distributed.get_world_size()
        check_finite_loss(loss, epoch, i)
        ctx.scaler.scale(loss).backward()
        if ni - ctx.last_opt_step >= ctx.accumulate or i == nb - 1:
            _optimizer_step(ctx)
            ctx.last_opt_step = ni
        mloss = (mloss * i + items) / (i + 1)
        mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
        row = (f"{epoch + 1}/{ctx.epochs}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1])
        bar.set_description(("%11s" * 2 + "%11.4g" * 5) % row)
        if ctx.plot_batch is not None and ni < 3:
            ctx.plot_batch(ni, imgs, targets, list(paths))
    return mloss.cpu()
