"""The Trainer: owns model, optimizer, schedule, EMA, loaders, loss, the epoch loop, checkpoints and resume.

Any head of any task trains through it: the loss comes from utils.loss.build_loss (by the head's kind), and data, loaders,
validation and plots from the model's task (utils.tasks), so a new head or task needs no change here. Rank and world
size are passed in (DistInfo), never read at import.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from models.model import DetectionModel
from models.pretrained import load_backbone_weights
from utils.checkpoint import (
    is_final,
    load_model,
    load_state,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from utils.cli import check_img_size
from utils.data.datasets import restarted
from utils.engine.amp import AmpPolicy, amp_policy
from utils.engine.callbacks import Callbacks
from utils.engine.config import TrainConfig
from utils.engine.early_stopping import EarlyStopping
from utils.engine.hyp import Hyp, default_hyp_file, default_optimizer, load_hyp
from utils.engine.memory_format import to_training_layout
from utils.engine.recipe import choose_schedule, close_mosaic_epochs
from utils.engine.results import append_results, truncate_results
from utils.engine.torch_utils import (
    GROUP_ORDER,
    ModelEMA,
    NonFiniteLossError,
    all_finite,
    build_scheduler,
    check_finite_loss,
    freeze_layers,
    init_seeds,
    optimizer_state_in_current_order,
    smart_optimizer,
    warmup_step,
)
from utils.engine.validation import report
from utils.files import atomic_write_text, remove_stale_temps
from utils.loggers import attach_loggers
from utils.loss import DetectionLoss, build_loss
from utils.tasks import Task, TrainBatch, get_task, task_of

LOGGER = logging.getLogger("mobile_yolo")
LOG_INTERVAL = 10  # batches between progress-bar refreshes (each one reads the losses back from the device)


class TrainError(ValueError):
    """A training setup problem (bad path, bad option); the message is one line."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a DDP run (-1 / 1 when not distributed)."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process logs, validates and saves."""
        return self.rank in (-1, 0)

    @classmethod
    def from_env(cls) -> DistInfo:
        """What torchrun sets in the environment (called by the command line, not at import)."""
        return cls(int(os.getenv("RANK", -1)), int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("WORLD_SIZE", 1)))


def transfer_weights(model: DetectionModel, ckpt: dict, weights: str) -> DetectionModel:
    """Copy every tensor of a checkpoint whose name and shape match (YOLOv5's --weights fine-tuning)."""
    state = ckpt.get("ema") or ckpt["model"]
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    LOGGER.info(f"Transferred {len(matched)}/{len(own)} items from {weights}")
    return model


def build_model(opt: TrainConfig, nc: int, names: list[str], device: torch.device) -> DetectionModel:
    """Model from --cfg (or the --weights / resume checkpoint's config), with fine-tuning or backbone weights applied."""
    weights = str(opt.weights or "")
    source = str(opt.resume) if opt.resume else weights  # any file name: a missing or foreign file is one error line
    if not opt.cfg and not source:
        raise TrainError("give --cfg (a model yaml) or --weights (a checkpoint file)")
    ckpt = read_checkpoint(source) if source else None
    if ckpt is not None and opt.resume:
        check_resumable(ckpt, source, opt.epochs)
    if ckpt is not None and (opt.resume or not opt.cfg):
        model = model_from_checkpoint(ckpt, source, nc=nc)
    else:
        model = DetectionModel(opt.cfg, ch=3, nc=nc, max_params=opt.max_params)
    if ckpt is not None and weights:
        transfer_weights(model, ckpt, weights)
    elif not opt.resume and (opt.backbone_weights or model.yaml.get("backbone_weights")):
        load_backbone_weights(model, opt.backbone_weights or model.yaml["backbone_weights"])
    model.names = list(names)
    return to_training_layout(model.to(device))  # channels-last, the loader's layout, where the CPU kernels are correct


def check_resumable(ckpt: dict, path: str, epochs: int) -> None:
    """Refuse, before anything is built, to resume from final weights (Trainer.save with final=True) of a run with epochs left:
    without the optimizer state and the raw weights the run would not continue as it was."""
    if is_final(ckpt) and int(ckpt.get("epoch", -1)) + 1 < epochs:
        raise TrainError(f"{path}: holds final weights only (no optimizer state), so training cannot resume from it; "
                         f"start a new run from it with --weights {path}")


def _multi_scale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """Resize the batch to a random size in [0.5, 1.5] x imgsz, a multiple of the stride."""
    size = int(np.random.uniform(imgsz * 0.5, imgsz * 1.5 + gs)) // gs * gs
    factor = size / max(imgs.shape[2:])
    if factor == 1:
        return imgs
    new = [math.ceil(x * factor / gs) * gs for x in imgs.shape[2:]]
    return torch.nn.functional.interpolate(imgs, size=new, mode="bilinear", align_corners=False)


def _check_task(task: Task, model: DetectionModel) -> None:
    """A model whose head belongs to another task than the script's (train.py, segment/train.py, ...) is refused."""
    own = task_of(model)
    if own is not task:
        raise TrainError(f"{task.train_script} trains {task.what}s; this model's {type(model.head).__name__} head makes it a "
                         f"{own.what}: train it with {own.train_script}")


class Trainer:
    """One training run. `fit()` returns the best checkpoint; `callbacks` lets loggers and user code follow along."""

    def __init__(
        self, opt: TrainConfig | argparse.Namespace, device: torch.device, dist: DistInfo = DistInfo(),
        callbacks: Callbacks | None = None,
    ) -> None:
        """`opt`: the resolved options (train_main resolves them; a Namespace is read as a TrainConfig). The Trainer never
        changes them: what it derives (the image size checked against the stride, the hyp file) are its own fields."""
        opt = TrainConfig.of(opt)
        if not str(getattr(opt, "save_dir", "") or ""):
            raise TrainError("Trainer: options need a save_dir (train.py derives it from --project/--name)")
        self.opt, self.device, self.dist = opt, device, dist
        self.callbacks = callbacks or Callbacks()
        if dist.main:  # the experiment loggers that are installed and not switched off (utils.loggers)
            attach_loggers(self.callbacks, owner=self)
        self.save_dir = Path(opt.save_dir)
        self.wdir = self.save_dir / "weights"
        self.best_fitness, self.start_epoch, self.last_opt_step = 0.0, 0, -1
        self.saved_epoch: int | None = None  # the epoch last.pt holds (None: none written by or for this run yet)
        self.setup()
        if dist.main and not opt.noplots:
            self.callbacks.register("on_train_batch_end", self._plot_first_batches)

    # ----- set-up -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data, model, hyperparameters, run folder, optimizer, schedule, loaders, loss, EMA and DDP wrapping."""
        opt = self.opt
        if opt.image_weights and self.dist.world_size > 1:
            raise TrainError(f"--image-weights is not supported with DDP ({self.dist.world_size} processes); train in one process")
        self.task = get_task(getattr(opt, "task", "detect"))
        self.data = self.task.load_data(opt.data)
        self.names: list[str] = ["item"] if opt.single_cls else [str(n) for n in self.data["names"]]
        self.nc = len(self.names)
        self.maps = np.zeros(self.nc)  # per-class mAP50-95 of the last validation (--image-weights)
        init_seeds(opt.seed + 1 + max(self.dist.rank, 0), deterministic=True)
        self.model: Any = build_model(opt, self.nc, self.names, self.device)
        _check_task(self.task, self.model)
        self.uses_targets = self.model.head.uses_targets  # RT-DETR's training forward builds denoising queries from them
        freeze = list(range(opt.freeze[0])) if len(opt.freeze) == 1 else list(opt.freeze)
        self.frozen = freeze_layers(self.model, freeze)
        self.gs = max(int(self.model.stride.max()), 32)
        self.imgsz: int = check_img_size(opt.imgsz, self.gs)
        hyp_file = opt.hyp or default_hyp_file(self.model.head_kind)
        self.hyp_file = Path(hyp_file)
        self.hyp: Hyp = load_hyp(hyp_file)
        overrides = self.task.hyp_overrides(opt)
        if overrides:
            self.hyp = Hyp.from_dict({**self.hyp.as_dict(), **overrides}, f"{hyp_file} with {', '.join(overrides)} from the flags")
        if self.dist.main:
            self._log_start()
        self._open_run_dir()
        self.batch = opt.batch_size // self.dist.world_size
        self._make_loaders()
        if self.dist.main:
            val_set = getattr(self.val_loader, "dataset", None)
            self.task.warn_output_cap(self.model, {"training set": self.dataset, "validation set": val_set})
        self.schedule = choose_schedule(opt.recipe, len(self.dataset), opt.batch_size, len(self.train_loader), opt.epochs,
                                        self.hyp.warmup_epochs, close_mosaic_epochs(opt.close_mosaic, self.model.head_kind, opt.epochs),
                                        mosaic=self.hyp.mosaic > 0)
        if self.dist.main:
            LOGGER.info(f"Schedule: {self.schedule.reason}")
        self.task.scale_augmentation(self.dataset, self.schedule, self.hyp.as_dict())  # before any worker starts with its copy
        self.accumulate = self.schedule.accumulate(opt.batch_size)
        self.optimizer = self._build_optimizer()
        self.scheduler, self.lf = build_scheduler(self.optimizer, opt.epochs, self.hyp.lrf, opt.cos_lr)
        if self.dist.main and not opt.resume:
            self.task.before_fit(self)
        loss_hyp = {**self.hyp.as_dict(), **self.task.loss_hyp(opt)}
        self.loss: DetectionLoss = build_loss(self.model, loss_hyp, self.imgsz, opt.label_smoothing)
        self.ema = ModelEMA(self.model) if self.dist.main else None
        self.use_amp(amp_policy(self.device))  # CUDA: float16 autocast with loss scaling; other devices: float32
        self._wrap_distributed()
        self.forward = torch.compile(self.model) if opt.compile else self.model  # the same module and weights, compiled

    def _log_start(self) -> None:
        """YOLOv5's opening lines: the hyperparameters this run uses and the model summary (layers, parameters, GFLOPs)."""
        LOGGER.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in self.hyp.as_dict().items()))
        self.model.info()

    def use_amp(self, policy: AmpPolicy) -> None:
        """Train the next steps under `policy` (utils.engine.amp): its autocast in train_step and a fresh GradScaler."""
        self.amp = policy
        self.scaler = policy.grad_scaler()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """--optimizer (auto: the head's recipe, AdamW for RT-DETR, else SGD), the backbone at hyp backbone_lr x lr0 when
        it starts from pretrained weights (a backbone trained from scratch at a tenth of the LR would barely learn)."""
        opt, model = self.opt, self.model
        name = default_optimizer(model.head_kind) if opt.optimizer == "auto" else opt.optimizer
        decay = self.hyp.weight_decay * opt.batch_size * self.accumulate / self.schedule.nominal_batch
        pretrained = bool(opt.weights or opt.backbone_weights or model.yaml.get("backbone_weights"))
        slow = tuple(f"model.{i}." for i in range(model.backbone_end)) if pretrained and self.hyp.backbone_lr != 1 else ()
        if self.hyp.backbone_lr != 1 and not pretrained and self.dist.main:
            LOGGER.info(f"hyp backbone_lr {self.hyp.backbone_lr:g} not applied: the backbone trains from scratch")
        return smart_optimizer(model, name, self.hyp.lr0, self.hyp.momentum, decay, fused=self.device.type == "cuda",
                               slow_prefixes=slow, slow_factor=self.hyp.backbone_lr)

    def _open_run_dir(self) -> None:
        """Create the run folder only once data and model loaded (bad input leaves no folder): weights/, opt.yaml, hyp.yaml."""
        self.wdir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temps(self.wdir, "*.pt"):
            LOGGER.info(f"Removed {stale.name}, left in {stale.parent} by an interrupted checkpoint save")
        if self.dist.main and not self.opt.resume:
            atomic_write_text(self.save_dir / "opt.yaml", yaml.safe_dump(self.options_record(), sort_keys=False))
            atomic_write_text(self.save_dir / "hyp.yaml", yaml.safe_dump(self.hyp.as_dict(), sort_keys=False))

    def _make_loaders(self) -> None:
        """The task's augmented training loader (per rank) and its validation loader (main rank)."""
        from utils.data.image_weights import EpochWeightedSampler

        opt = self.opt
        hyp, rank = self.hyp.as_dict(), self.dist.local_rank
        self.train_loader, self.dataset = self.task.train_loader(self.data, opt, hyp, self.imgsz, self.batch, self.gs, rank)
        sampler = self.train_loader.sampler
        self.image_sampler = sampler if isinstance(sampler, EpochWeightedSampler) else None
        self.val_loader = None
        if self.dist.main:
            self.val_loader = self.task.val_loader(
                self.data, "val", self.imgsz, self.batch * 2, self.gs, rect=True, single_cls=opt.single_cls, workers=opt.workers,
                cache=None if opt.noval else opt.cache, opt=opt,
            )

    def _wrap_distributed(self) -> None:
        """SyncBatchNorm and DistributedDataParallel when running under torchrun."""
        if self.dist.rank == -1:
            return
        if self.opt.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        ids = [self.dist.local_rank] if self.device.type == "cuda" else None
        # a batch without boxes leaves RT-DETR's denoising embedding unused on that rank
        self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=self.uses_targets)

    # ----- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train every epoch: train, validate the EMA, log results.csv, save last/best, early-stop; returns best.pt."""
        from utils.data.image_weights import epoch_image_weights

        opt = self.opt
        if opt.resume:
            self.restore(read_checkpoint(str(opt.resume)))
        self.scheduler.last_epoch = self.start_epoch - 1
        nb = len(self.train_loader)
        self.warmup_iters = self.schedule.warmup_iters
        self.last_opt_step = self.start_epoch * nb - 1
        truncate_results(self.save_dir / "results.csv", self.start_epoch - 1, self.loss.names, self.task.metric_columns)
        self.stopper, t0 = EarlyStopping(opt.patience), time.time()
        LOGGER.info(f"Image sizes {self.imgsz} train, {self.imgsz} val\nLogging results to {self.save_dir}")
        LOGGER.info(f"Starting training for {opt.epochs} epochs...")
        self.callbacks.run("on_train_start", trainer=self)
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, opt.epochs):
            if self.schedule.close_mosaic and epoch == opt.epochs - self.schedule.close_mosaic:
                self.dataset.close_mosaic()
                self.train_loader = restarted(self.train_loader)  # persistent workers hold their own copy of the dataset
            if self.image_sampler is not None:  # --image-weights: favour rare and poorly detected classes this epoch
                self.image_sampler.set_weights(epoch_image_weights(self.dataset.labels, self.nc, self.maps))
            self.loss.start_epoch(epoch, opt.epochs)  # losses with a schedule (the end-to-end head's branch weights)
            mloss = self.train_one_epoch(epoch)
            lrs = [g["lr"] for g in self.optimizer.param_groups][:3]  # x/lr0..2: the (non-backbone) YOLOv5 groups
            self.scheduler.step()
            self.callbacks.run("on_train_epoch_end", trainer=self, epoch=epoch, losses=mloss)
            stop, diverged = False, ""
            try:
                stop = self._end_epoch(epoch, mloss, lrs) if self.dist.main else False
            except NonFiniteLossError as e:  # nothing of this epoch was saved: last.pt and best.pt keep finite weights
                diverged = str(e)
            if self._broadcast_stop(stop, diverged):
                break
        return self._finish(t0, epoch - self.start_epoch + 1)

    def train_one_epoch(self, epoch: int) -> torch.Tensor:
        """One pass over the training loader; returns the mean loss items.

        Loss items stay on the device: they are read back (one host-device sync) only every LOG_INTERVAL batches, to
        refresh the progress bar and to stop on a non-finite loss.
        """
        self.model.train()
        nb = len(self.train_loader)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        mloss = torch.zeros(len(self.loss.names), device=self.device)
        if self.dist.main:
            LOGGER.info(("%11s" * (4 + len(self.loss.names))) % ("Epoch", "GPU_mem", *self.loss.names, "Instances", "Size"))
        bar = tqdm(enumerate(self.train_loader), total=nb, disable=not self.dist.main, bar_format="{l_bar}{bar:10}{r_bar}")
        self.optimizer.zero_grad(set_to_none=True)
        for i, raw_batch in bar:
            ni = i + nb * epoch
            batch = self.task.train_batch(raw_batch, self.device)
            imgs, targets = batch.imgs, batch.targets
            items = self.train_step(imgs, targets, ni, epoch, last=i == nb - 1, extras=batch.extras)
            mloss = (mloss * i + items) / (i + 1)
            if i % LOG_INTERVAL == 0 or i == nb - 1:
                means = mloss.tolist()
                check_finite_loss(torch.tensor(means), epoch, i, hint=self._divergence_hint())
                mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                row = (f"{epoch + 1}/{self.opt.epochs}", mem, *means, targets.shape[0], imgs.shape[-1])
                bar.set_description(("%11s" * 2 + "%11.4g" * (len(means) + 2)) % row)
            self.callbacks.run("on_train_batch_end", trainer=self, ni=ni, imgs=imgs, targets=targets, paths=list(batch.paths))
        return mloss.cpu()

    def train_step(
        self, imgs: torch.Tensor, targets: torch.Tensor, ni: int, epoch: int, last: bool = False, extras: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Warm-up, forward, loss, AMP backward and (every `accumulate` batches) an optimizer + EMA step; returns loss items.

        `extras` are the batch's further loss inputs (the task's, e.g. ground-truth masks)."""
        if ni <= self.warmup_iters:
            warmup_step(self.optimizer, ni, self.warmup_iters, epoch, self.lf, self.hyp.as_dict())
        if self.opt.multi_scale:
            imgs = _multi_scale(imgs, self.imgsz, self.gs)
        with self.amp.autocast():
            targets = targets.to(self.device)
            preds = self.forward(imgs, targets=targets) if self.uses_targets else self.forward(imgs)
            loss, items = self.loss(preds, targets, *(extras or []))
        loss = loss * 4 if self.opt.quad else loss  # --quad: a quarter as many images per batch (YOLOv5's factor)
        if self.dist.rank != -1:
            loss = loss * self.dist.world_size  # DDP averages gradients over processes
        self.scaler.scale(loss).backward()
        if ni - self.last_opt_step >= self.accumulate or last:
            self._optimizer_step()
            self.last_opt_step = ni
        return items

    def _optimizer_step(self) -> None:
        """Unscale, clip, step, zero and update the EMA."""
        self.scaler.unscale_(self.optimizer)
        if self.hyp.clip_grad > 0:  # 0 turns clipping off
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.hyp.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def _plot_first_batches(self, ni: int, imgs: torch.Tensor, targets: torch.Tensor, paths: list, **_: Any) -> None:
        """train_batch0..2.jpg: the first three training batches with their labels, drawn by the task."""
        if ni < 3:
            self.task.plot_train_batch(TrainBatch(imgs, targets, paths, []), self.save_dir / f"train_batch{ni}.jpg", self.names)

    # ----- validation and checkpoints ------------------------------------------------------------------------------
    def validate(self, model: torch.nn.Module, plots: bool, verbose: bool = False) -> Any:
        """Evaluate `model` on the validation loader in-process (with the validation loss), by the task's loop, and log the
        result's own table (the task's metrics: boxes, boxes and masks, or top-1/top-5), per class when `verbose`."""
        result = self.task.validate(
            model, self.val_loader, self.task.evaluator(self.nc, self.names), device=self.device, compute_loss=self.loss,
            half=self.device.type == "cuda", plots=plots, save_dir=self.save_dir, names=self.names, single_cls=self.opt.single_cls,
            quiet=not verbose,
        )
        report(result, verbose)
        return result

    def _end_epoch(self, epoch: int, mloss: torch.Tensor, lrs: list[float]) -> bool:
        """Main rank after each epoch: validate, log results.csv, save last/best (atomically); returns whether to stop."""
        opt = self.opt
        final = epoch + 1 == opt.epochs or self.stopper.possible_stop
        assert self.ema is not None  # the main rank always keeps one
        if not all_finite([*self.model.parameters(), *self.ema.ema.state_dict().values()]):
            raise NonFiniteLossError(f"the weights became NaN/inf at epoch {epoch} (the training loss was still finite); "
                                     f"{self._divergence_hint()}")
        if not opt.noval or final:
            result = self.validate(self.ema.ema, plots=final and not opt.noplots)
            row, self.maps, fit = result.results_row(), result.maps, result.fitness()
            if not all(math.isfinite(v) for v in (*row, fit)):
                raise NonFiniteLossError(f"the validation losses or metrics became NaN/inf at epoch {epoch}; {self._divergence_hint()}")
        else:
            row, fit = (0.0,) * (len(self.task.metric_columns) + len(self.loss.names)), 0.0
        stop = self.stopper(epoch, fit)
        self.best_fitness = max(self.best_fitness, fit)
        append_results(self.save_dir / "results.csv", epoch, mloss.tolist(), row, lrs, self.loss.names, self.task.metric_columns)
        self.callbacks.run("on_fit_epoch_end", trainer=self, epoch=epoch, results=row)
        if not opt.nosave or epoch + 1 == opt.epochs or stop:
            self.save(self.wdir / "last.pt", epoch, final=epoch + 1 == opt.epochs)  # nothing left to resume: final weights
            self.saved_epoch = epoch
            if self.best_fitness == fit:
                self.save(self.wdir / "best.pt", epoch, final=True)  # never resumed from: final weights from the start
            if opt.save_period > 0 and epoch % opt.save_period == 0:
                self.save(self.wdir / f"epoch{epoch}.pt", epoch)
        return stop

    def _divergence_hint(self) -> str:
        """The likely cause of a diverged run and what is kept on disk, ending its one-line error."""
        where = "--lr0" if "lr0" in self.task.hyp_overrides(self.opt) else str(self.hyp_file)
        kept = (f"{self.wdir / 'last.pt'} (epoch {self.saved_epoch}) and best.pt keep the last finite weights"
                if self.saved_epoch is not None else "no weights were saved")
        return f"the learning rate is likely too high (lr0 {self.hyp.lr0:g} from {where}): lower it, or check the labels; {kept}"

    def options_record(self) -> dict[str, Any]:
        """What opt.yaml and checkpoints record: the options, with the image size and hyp file this run actually used."""
        return {**self.opt.as_dict(), "imgsz": self.imgsz, "hyp": str(self.hyp_file)}

    def save(self, path: Path, epoch: int, final: bool = False) -> None:
        """Checkpoint: model + EMA state_dicts, optimizer, epoch, fitness, options, hyp, names (atomic write); `final`
        writes final weights instead (utils.checkpoint.final_weights: the EMA in float16, no optimizer), as YOLOv5's
        strip_optimizer leaves best.pt and, once every epoch has run, last.pt."""
        assert self.ema is not None
        save_checkpoint(
            path, unwrap_model(self.model), final=final, names=self.names, ema=self.ema.ema.state_dict(), updates=self.ema.updates,
            optimizer=self.optimizer.state_dict(), optimizer_groups=GROUP_ORDER, epoch=epoch, best_fitness=float(self.best_fitness),
            opt=self.options_record(), hyp=self.hyp.as_dict(),
        )
        self.callbacks.run("on_model_save", trainer=self, path=path)

    def restore(self, ckpt: dict) -> None:
        """Load model, EMA, optimizer and counters from a resume checkpoint."""
        path = str(self.opt.resume)
        check_resumable(ckpt, path, self.opt.epochs)
        load_state(unwrap_model(self.model), ckpt["model"], path)
        if ckpt.get("ema") and self.ema is not None:
            load_state(self.ema.ema, ckpt["ema"], path, "EMA weights")
            self.ema.updates = int(ckpt.get("updates", 0))
        if ckpt.get("optimizer"):
            state = optimizer_state_in_current_order(ckpt["optimizer"], ckpt.get("optimizer_groups"))
            load_state(self.optimizer, state, path, "optimizer state")
        self.start_epoch = int(ckpt.get("epoch", -1)) + 1
        self.saved_epoch = self.start_epoch - 1
        if self.start_epoch >= self.opt.epochs:
            raise TrainError(f"{path}: training already finished ({self.start_epoch} epochs); nothing to resume")
        self.best_fitness = float(ckpt.get("best_fitness", 0.0))
        LOGGER.info(f"Resuming training from {path} at epoch {self.start_epoch + 1} of {self.opt.epochs}")

    def _report_final_weights(self, best: Path, last: Path) -> None:
        """Name the files that hold final weights (after an early stop last.pt stays a full checkpoint --resume continues)."""
        finals = [p for p in (best, last) if p.is_file() and (p == best or self.saved_epoch == self.opt.epochs - 1)]
        if finals:
            sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in finals)
            LOGGER.info(f"Final weights (EMA in float16, no optimizer): {sizes}")

    def _broadcast_stop(self, stop: bool, diverged: str = "") -> bool:
        """Share the main rank's early-stop decision with every DDP rank; a divergence message stops all of them with it."""
        flag: list[Any] = [stop, diverged]
        if self.dist.rank != -1:
            torch.distributed.broadcast_object_list(flag, 0)
        if flag[1]:
            raise NonFiniteLossError(str(flag[1]))
        return bool(flag[0])

    def _finish(self, t0: float, epochs_done: int) -> Path:
        """Final validation of best.pt with plots, results.png and the closing log lines (main rank)."""
        best, last = self.wdir / "best.pt", self.wdir / "last.pt"
        if not self.dist.main:
            return last
        LOGGER.info(f"\n{epochs_done} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        self._report_final_weights(best, last)
        if best.exists() and not self.opt.noval:
            LOGGER.info(f"\nValidating {best}...")
            self.validate(load_model(best, self.device).fuse(), plots=not self.opt.noplots, verbose=True)
        if not self.opt.noplots and (self.save_dir / "results.csv").exists():
            from utils.plots import plot_results

            plot_results(self.save_dir / "results.csv")
        LOGGER.info(f"Results saved to {self.save_dir}")
        result = best if best.exists() else last
        self.callbacks.run("on_train_end", trainer=self, best=result)
        return result
