"""PyTorch training helpers: EMA weights, optimizer groups, LR schedules, warm-up, seeding, freezing."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from utils.checkpoint import unwrap_model
from utils.device import select_device
from utils.engine.amp import amp_policy

LOGGER = logging.getLogger("mobile_yolo")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
BIAS_GROUP = 0  # YOLOv5's parameter-group order: biases, decayed weights, norm weights
GROUP_ORDER = "bias,weight,norm"  # recorded in checkpoints; older ones (no record) saved "norm,weight,bias"


class NonFiniteLossError(RuntimeError):
    """The training loss became nan/inf; the message is one line with a hint."""


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel/DistributedDataParallel wrapper (or the model itself)."""
    return unwrap_model(model)


class ModelEMA:
    """Exponential moving average of a model's floating-point state; `ema` is the averaged copy used for eval/saving."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay_max = decay
        self.tau = tau
        self.updates = updates

    def decay(self, updates: int) -> float:
        """Decay after `updates` steps: ramps from 0 to decay_max so early (random) weights are forgotten quickly."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the current weights of `model` (wrapped or not)."""
        self.updates += 1
        d = self.decay(self.updates)
        current = de_parallel(model).state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach().to(value.dtype), alpha=1 - d)


def _is_norm(module: nn.Module) -> bool:
    """BatchNorm/LayerNorm/GroupNorm-style layers (any class whose name contains 'Norm')."""
    return "Norm" in type(module).__name__


def smart_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937, decay: float = 1e-5, fused: bool = False,
    slow_prefixes: tuple[str, ...] = (), slow_factor: float = 1.0,
) -> torch.optim.Optimizer:
    """Optimizer with YOLOv5's groups: [0] biases (no decay), [1] weights (decay), [2] norm weights + 1-D scales (no decay).

    The order is YOLOv5's, so results.csv's x/lr0..2 name the same groups (bias first) for tools that plot YOLOv5 runs.
    Parameters under `slow_prefixes` (e.g. "model.0.", a pretrained backbone) form groups [3..5] in the same order at
    lr * slow_factor (RT-DETR's backbone LR). fused: one kernel per step (worth it on CUDA, no faster on the CPU).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    fast: list[list[nn.Parameter]] = [[], [], []]  # biases, decayed weights, no-decay weights
    slow: list[list[nn.Parameter]] = [[], [], []]
    for module_name, module in de_parallel(model).named_modules():
        lists = slow if slow_prefixes and f"{module_name}.".startswith(slow_prefixes) else fast
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias":
                lists[0].append(p)
            elif (pname == "weight" and _is_norm(module)) or p.ndim <= 1:
                lists[2].append(p)  # norm weights and LayerScale-like per-channel gains
            else:
                lists[1].append(p)
    groups: list[dict[str, Any]] = []
    for params, scale in ((fast, 1.0), (slow, slow_factor)) if any(slow) else ((fast, 1.0),):
        groups += [{"params": params[0], "weight_decay": 0.0, "lr": lr * scale},
                   {"params": params[1], "weight_decay": decay, "lr": lr * scale},
                   {"params": params[2], "weight_decay": 0.0, "lr": lr * scale}]
    if name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=fused or None)
    elif name == "Adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999), fused=fused or None)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused or None)
    slow_note = f"; {sum(map(len, slow))} backbone tensors at lr x{slow_factor:g}" if len(groups) > 3 else ""
    LOGGER.info(f"optimizer: {name}(lr={lr}) with {len(fast[0]) + len(slow[0])} biases, {len(fast[1]) + len(slow[1])} weights "
                f"(decay={decay}), {len(fast[2]) + len(slow[2])} no-decay weights{slow_note}")
    return opt


def one_cycle(y1: float = 0.0, y2: float = 1.0, steps: int = 100) -> Callable[[float], float]:
    """Half-cosine ramp from y1 at 0 to y2 at `steps`."""
    return lambda x: (1 - math.cos(x * math.pi / steps)) / 2 * (y2 - y1) + y1


def linear_lr(lrf: float, epochs: int) -> Callable[[float], float]:
    """Linear LR factor from 1 at epoch 0 to lrf at `epochs`."""
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


def build_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, lrf: float, cos_lr: bool = False
) -> tuple[torch.optim.lr_scheduler.LambdaLR, Callable[[float], float]]:
    """Per-epoch LambdaLR (cosine or linear from 1 to lrf) and its factor function (warm-up needs it too)."""
    lf = one_cycle(1.0, lrf, epochs) if cos_lr else linear_lr(lrf, epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf), lf


def warmup_step(optimizer: torch.optim.Optimizer, ni: int, nw: int, epoch: int, lr_lambda: Callable[[float], float], hyp: dict) -> None:
    """Warm-up for iteration ni of nw: bias LR falls from warmup_bias_lr, other LRs rise from 0, momentum rises to hyp momentum."""
    xi = [0, max(nw, 1)]
    for j, group in enumerate(optimizer.param_groups):
        start = float(hyp.get("warmup_bias_lr", 0.0)) if j == BIAS_GROUP else 0.0
        target = group.get("initial_lr", hyp["lr0"]) * lr_lambda(epoch)
        group["lr"] = float(np.interp(ni, xi, [start, target]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, xi, [hyp.get("warmup_momentum", 0.8), hyp["momentum"]]))


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with deterministic=True also ask torch/cuDNN for reproducible kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


def time_sync() -> float:
    """Wall time in seconds after waiting for queued CUDA work (so GPU timings are real)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def model_param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze_layers(model: nn.Module, freeze: list[int]) -> list[str]:
    """Stop gradients to every parameter under `model.{i}.` for i in freeze; returns their names.

    Parameters a module keeps fixed by design (the anchor-free head's DFL projection) stay fixed.
    """
    prefixes = tuple(f"model.{int(i)}." for i in freeze)
    frozen = []
    for name, p in de_parallel(model).named_parameters():
        if prefixes and name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    if frozen:
        LOGGER.info(f"freezing {len(frozen)} parameter tensors in layers {sorted({int(i) for i in freeze})}")
    return frozen


def check_finite_loss(loss: torch.Tensor, epoch: int, batch_i: int, hint: str = "lower --lr0 or check labels") -> None:
    """Raise NonFiniteLossError (ending in `hint`) when the loss is nan/inf, so training stops instead of silently diverging."""
    if not bool(torch.isfinite(loss.detach()).all()):
        kind = "nan" if bool(torch.isnan(loss.detach()).any()) else "inf"
        raise NonFiniteLossError(f"loss became {kind} at epoch {epoch} batch {batch_i}; {hint}")


def all_finite(tensors: Any) -> bool:
    """Whether every floating-point tensor of an iterable holds only finite values (one device sync in all)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def auto_batch_size(source: Any, imgsz: int = 640, fraction: float = 0.8, default: int = 16) -> int:
    """Largest batch expected to use `fraction` of free CUDA memory, from a model or train options; `default` off CUDA."""
    device = torch.device("cuda:0")
    if isinstance(source, nn.Module):
        model = de_parallel(source)
    else:
        from models.model import DetectionModel
        from utils.checkpoint import read_checkpoint

        device = select_device(getattr(source, "device", ""))
        imgsz = int(getattr(source, "imgsz", imgsz))
        cfg = getattr(source, "cfg", "") or read_checkpoint(source.weights)["cfg"]
        model = DetectionModel(cfg)
    if not torch.cuda.is_available() or device.type != "cuda":
        LOGGER.warning(f"AutoBatch: CUDA not available, using the default batch size {default}")
        return default
    return _probe_batch(model, device, imgsz, fraction, default)


def _probe_batch(model: nn.Module, device: torch.device, imgsz: int, fraction: float, default: int) -> int:
    """Fit peak memory vs batch size on a few trial batches and solve for the target memory."""
    model = copy.deepcopy(model).to(device).train()
    free, _total = torch.cuda.mem_get_info(device)
    sizes, mems = [], []
    for b in (1, 2, 4, 8, 16):
        try:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with amp_policy(device).autocast():  # the precision the Trainer will train in
                out = model(torch.zeros(b, 3, imgsz, imgsz, device=device))
                loss = sum(o.float().sum() for o in out)
            loss.backward()
            sizes.append(b)
            mems.append(torch.cuda.max_memory_allocated(device) - base)
            model.zero_grad(set_to_none=True)
        except torch.cuda.OutOfMemoryError:
            break
    del model
    torch.cuda.empty_cache()
    if len(sizes) < 2:
        LOGGER.warning(f"AutoBatch: could not probe memory, using the default batch size {default}")
        return default
    slope, intercept = np.polyfit(sizes, mems, 1)
    batch = int((free * fraction - intercept) / max(slope, 1.0))
    batch = max(1, min(batch, 1024))
    LOGGER.info(f"AutoBatch: batch size {batch} for {fraction:.0%} of {free / 2**30:.1f} GiB free CUDA memory")
    return batch


def optimizer_state_in_current_order(state: dict[str, Any], order: str | None) -> dict[str, Any]:
    """An optimizer state_dict saved with another group order, rearranged to GROUP_ORDER (older checkpoints resume)."""
    if order == GROUP_ORDER or not isinstance(state, dict) or len(state.get("param_groups", [])) != 3:
        return state
    return {**state, "param_groups": list(reversed(state["param_groups"]))}  # "norm,weight,bias" -> "bias,weight,norm"
