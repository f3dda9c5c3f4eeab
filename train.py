"""Train a detector: python train.py --cfg models/yolov5_mobilenetv4.yaml (embedded shapes dataset by default)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import val as validate
from models.pretrained import load_backbone_weights
from models.yolo import DetectionModel
from utils.checkpoint import load_state, model_from_checkpoint, read_checkpoint, save_checkpoint, unwrap_model
from utils.cli import check_img_size, check_int, error_boundary
from utils.data.dataset_config import load_dataset_config
from utils.engine.early_stopping import EarlyStopping
from utils.engine.results import append_results, truncate_results
from utils.engine.tb_logger import TensorBoardLogger
from utils.engine.torch_utils import (
    ModelEMA,
    NonFiniteLossError,
    build_scheduler,
    freeze_layers,
    init_seeds,
    select_device,
    smart_optimizer,
)
from utils.engine.train_loop import NOMINAL_BATCH, TrainContext, train_one_epoch
from utils.evaluation.metrics import fitness
from utils.files import atomic_write_text, remove_stale_temps
from utils.logs import set_logging
from utils.paths import ROOT, increment_path

LOGGER = logging.getLogger("mobile_yolo")
DEFAULT_CFG = "models/yolov5_mobilenetv4.yaml"
DEFAULT_HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"
LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


class TrainError(ValueError):
    """A training setup problem (bad path, bad option); the message is one line."""


def load_hyp(hyp: Any) -> dict:
    """Hyperparameters from a yaml path or dict."""
    if isinstance(hyp, dict):
        return dict(hyp)
    path = Path(hyp)
    if not path.is_file():
        raise TrainError(f"{path}: hyperparameter file not found")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise TrainError(f"{path}: hyperparameters must be a mapping")
    return data


def transfer_weights(model: DetectionModel, ckpt: dict, weights: str) -> DetectionModel:
    """Copy every tensor of a checkpoint whose name and shape match (YOLOv5's --weights fine-tuning)."""
    state = ckpt.get("ema") or ckpt["model"]
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    LOGGER.info(f"Transferred {len(matched)}/{len(own)} items from {weights}")
    return model


def build_model(opt: argparse.Namespace, nc: int, names: list[str], device: torch.device) -> DetectionModel:
    """Model from --cfg (or the --weights checkpoint's config), with fine-tuning or backbone weights applied."""
    weights = str(opt.weights or "")
    source = str(opt.resume) if opt.resume else weights  # any file name: a missing or foreign file is one error line
    if not opt.cfg and not source:
        raise TrainError("give --cfg (a model yaml) or --weights (a checkpoint file)")
    ckpt = read_checkpoint(source) if source else None
    if ckpt is not None and (opt.resume or not opt.cfg):
        model = model_from_checkpoint(ckpt, source, nc=nc)
    else:
        model = DetectionModel(opt.cfg, ch=3, nc=nc)
    if ckpt is not None and weights:
        transfer_weights(model, ckpt, weights)
    elif not opt.resume and (opt.backbone_weights or model.yaml.get("backbone_weights")):
        load_backbone_weights(model, opt.backbone_weights or model.yaml["backbone_weights"])
    model.names = list(names)
    return model.to(device)


def make_loaders(opt: argparse.Namespace, data: dict, hyp: dict, gs: int, batch: int) -> tuple[Any, Any, Any]:
    """Augmented training loader (per rank) and the rectangular validation loader (rank 0)."""
    from utils.data.datasets import create_dataloader

    train_loader, dataset = create_dataloader(
        data["train"], opt.imgsz, batch, gs, single_cls=opt.single_cls, hyp=hyp, augment=True, cache=opt.cache,
        rect=opt.rect, workers=opt.workers, shuffle=not opt.rect, prefix="train: ", nc=int(data["nc"]), seed=opt.seed,
        rank=LOCAL_RANK,
    )
    val_loader = None
    if RANK in (-1, 0):
        val_loader = create_dataloader(
            data["val"], opt.imgsz, batch * 2, gs, single_cls=opt.single_cls, cache=None if opt.noval else opt.cache,
            rect=True, pad=0.5, workers=opt.workers, prefix="val: ", nc=int(data["nc"]),
        )[0]
    return train_loader, dataset, val_loader


def plain_opt(opt: argparse.Namespace) -> dict:
    """Options as plain data (paths as strings) for opt.yaml and checkpoints."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


def save_run_checkpoint(path: Path, run: dict, epoch: int, best_fitness: float) -> None:
    """last.pt/best.pt: model + EMA state_dicts, optimizer, epoch, fitness, options, hyp, names (atomic)."""
    save_checkpoint(
        path, unwrap_model(run["model"]), names=run["names"], ema=run["ema"].ema.state_dict(), updates=run["ema"].updates,
        optimizer=run["optimizer"].state_dict(), epoch=epoch, best_fitness=float(best_fitness),
        opt=plain_opt(run["opt"]), hyp=run["hyp"],
    )


def restore(run: dict, ckpt: dict) -> tuple[int, float]:
    """Load model, EMA, optimizer and counters from a resume checkpoint; returns (start_epoch, best_fitness)."""
    path = run["opt"].resume
    load_state(unwrap_model(run["model"]), ckpt["model"], path)
    if ckpt.get("ema") and run["ema"] is not None:
        load_state(run["ema"].ema, ckpt["ema"], path, "EMA weights")
        run["ema"].updates = int(ckpt.get("updates", 0))
    if ckpt.get("optimizer"):
        load_state(run["optimizer"], ckpt["optimizer"], path, "optimizer state")
    start = int(ckpt.get("epoch", -1)) + 1
    if start >= run["opt"].epochs:
        raise TrainError(f"{run['opt'].resume}: training already finished ({start} epochs); nothing to resume")
    LOGGER.info(f"Resuming training from {run['opt'].resume} at epoch {start + 1} of {run['opt'].epochs}")
    return start, float(ckpt.get("best_fitness", 0.0))


def setup(opt: argparse.Namespace, device: torch.device) -> dict:
    """Everything a run needs: folders, data, model, loaders, loss, optimizer, scheduler, EMA."""
    from utils.engine.autoanchor import check_anchors, label_wh_from_dataset
    from utils.loss.anchor_based import ComputeLoss, scale_loss_gains

    save_dir, hyp = Path(opt.save_dir), load_hyp(opt.hyp)
    data = load_dataset_config(opt.data)
    nc, names = (1, ["item"]) if opt.single_cls else (int(data["nc"]), list(data["names"]))
    init_seeds(opt.seed + 1 + max(RANK, 0), deterministic=True)
    model = build_model(opt, nc, names, device)
    frozen = freeze_layers(model, list(range(opt.freeze[0])) if len(opt.freeze) == 1 else opt.freeze)
    gs = max(int(model.stride.max()), 32)
    opt.imgsz = check_img_size(opt.imgsz, gs)
    open_run_dir(opt, hyp)
    batch = opt.batch_size // WORLD_SIZE
    hyp["weight_decay"] *= opt.batch_size * max(round(NOMINAL_BATCH / opt.batch_size), 1) / NOMINAL_BATCH
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    scheduler, lf = build_scheduler(optimizer, opt.epochs, hyp["lrf"], opt.cos_lr)
    train_loader, dataset, val_loader = make_loaders(opt, data, hyp, gs, batch)
    if RANK in (-1, 0) and not opt.resume and not opt.noautoanchor:
        wh = label_wh_from_dataset(dataset.img_shapes[:, ::-1], dataset.labels, opt.imgsz)
        check_anchors(wh, model, thr=hyp["anchor_t"], imgsz=opt.imgsz)
    if RANK in (-1, 0) and not opt.noplots and not opt.resume:
        _plot_labels(dataset, names, save_dir)
    hyp = scale_loss_gains(hyp, model.detect.nl, nc, opt.imgsz)
    hyp["label_smoothing"] = opt.label_smoothing
    ema = ModelEMA(model) if RANK in (-1, 0) else None
    run = dict(opt=opt, hyp=hyp, data=data, names=names, model=model, optimizer=optimizer, scheduler=scheduler, lf=lf,
               ema=ema, train_loader=train_loader, val_loader=val_loader, save_dir=save_dir, gs=gs, batch=batch,
               compute_loss=ComputeLoss(model, hyp, label_smoothing=opt.label_smoothing), frozen=frozen)
    if opt.sync_bn and RANK != -1:
        run["model"] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if RANK != -1:
        run["model"] = torch.nn.parallel.DistributedDataParallel(run["model"], device_ids=[LOCAL_RANK] if device.type == "cuda" else None)
    return run


def open_run_dir(opt: argparse.Namespace, hyp: dict) -> None:
    """Create the run folder only once data and model loaded (bad input leaves no folder): weights/, opt.yaml, hyp.yaml."""
    save_dir = Path(opt.save_dir)
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(save_dir / "weights", "*.pt"):
        LOGGER.info(f"Removed {stale.name}, left in {stale.parent} by an interrupted checkpoint save")
    if RANK in (-1, 0) and not opt.resume:
        atomic_write_text(save_dir / "opt.yaml", yaml.safe_dump(plain_opt(opt), sort_keys=False))
        atomic_write_text(save_dir / "hyp.yaml", yaml.safe_dump(hyp, sort_keys=False))


def _plot_labels(dataset: Any, names: list[str], save_dir: Path) -> None:
    """labels.jpg: class histogram and box statistics of the training labels."""
    from utils.plots import plot_labels

    labels = np.concatenate([lb[:, :5] for lb in dataset.labels if len(lb)], 0) if len(dataset.labels) else np.zeros((0, 5))
    if len(labels):
        plot_labels(labels, names, save_dir / "labels.jpg")


def _batch_plotter(save_dir: Path, names: list[str]):  # type: ignore[no-untyped-def]
    """Callback writing train_batch0..2.jpg mosaics with their labels."""
    from utils.plots import plot_images

    def plot(ni: int, imgs: torch.Tensor, targets: torch.Tensor, paths: list) -> None:
        plot_images((imgs.detach() * 255).byte().cpu(), targets.cpu(), paths, save_dir / f"train_batch{ni}.jpg", names)

    return plot


def _validate(run: dict, epoch: int, final: bool) -> tuple[tuple[float, ...], np.ndarray]:
    """val.run in-process on the EMA model (no plots until the end)."""
    results, maps, _ = validate.run(
        data=run["data"], batch_size=run["batch"] * 2, imgsz=run["opt"].imgsz, model=run["ema"].ema, single_cls=run["opt"].single_cls,
        dataloader=run["val_loader"], save_dir=run["save_dir"], plots=final and not run["opt"].noplots, compute_loss=run["compute_loss"],
        half=run["device"].type == "cuda", quiet=True,
    )
    return results, maps


def train(opt: argparse.Namespace, device: torch.device) -> Path:
    """The epoch loop: train, validate (EMA), log results.csv, save last/best, early-stop."""
    run = setup(opt, device)
    run["device"] = device
    save_dir, main_rank = run["save_dir"], RANK in (-1, 0)
    start_epoch, best_fitness = restore(run, read_checkpoint(opt.resume)) if opt.resume else (0, 0.0)
    run["scheduler"].last_epoch = start_epoch - 1
    nb, hyp = len(run["train_loader"]), run["hyp"]
    ctx = TrainContext(
        model=run["model"], optimizer=run["optimizer"], scaler=torch.amp.GradScaler(device.type, enabled=device.type == "cuda"),
        ema=run["ema"], compute_loss=run["compute_loss"], loader=run["train_loader"], device=device, hyp=hyp, lf=run["lf"],
        batch_size=opt.batch_size, imgsz=opt.imgsz, epochs=opt.epochs, multi_scale=opt.multi_scale, gs=run["gs"], rank=RANK,
        warmup_iters=max(round(hyp["warmup_epochs"] * nb), 100) if hyp["warmup_epochs"] > 0 else -1,
        plot_batch=None if opt.noplots or not main_rank else _batch_plotter(save_dir, run["names"]),
        last_opt_step=start_epoch * nb - 1,
    )
    truncate_results(save_dir / "results.csv", start_epoch - 1)
    stopper, t0 = EarlyStopping(opt.patience), time.time()
    LOGGER.info(f"Image sizes {opt.imgsz} train, {opt.imgsz} val\nLogging results to {save_dir}")
    LOGGER.info(f"Starting training for {opt.epochs} epochs...")
    run["best_fitness"] = best_fitness
    run["tb"] = TensorBoardLogger(save_dir)
    epoch = start_epoch
    for epoch in range(start_epoch, opt.epochs):
        if opt.close_mosaic and epoch == opt.epochs - opt.close_mosaic:
            run["train_loader"].dataset.close_mosaic()
        mloss = train_one_epoch(ctx, epoch)
        lrs = [g["lr"] for g in run["optimizer"].param_groups]
        run["scheduler"].step()
        stop = _end_epoch(run, epoch, mloss, lrs, stopper) if main_rank else False
        if _broadcast_stop(stop):
            break
    return _finish(run, opt, t0, epoch - start_epoch + 1)


def _end_epoch(run: dict, epoch: int, mloss: torch.Tensor, lrs: list[float], stopper: EarlyStopping) -> bool:
    """Rank 0 after each epoch: validate, log results.csv, save last/best (atomically); returns whether to stop."""
    opt, wdir = run["opt"], run["save_dir"] / "weights"
    final = epoch + 1 == opt.epochs or stopper.possible_stop
    results = _validate(run, epoch, final)[0] if not opt.noval or final else (0.0,) * 7
    fit = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
    stop = stopper(epoch, fit)
    run["best_fitness"] = max(run["best_fitness"], fit)
    append_results(run["save_dir"] / "results.csv", epoch, mloss.tolist(), results, lrs)
    run["tb"].log_epoch(epoch, [*mloss.tolist(), *results, *lrs])
    if not opt.nosave or epoch + 1 == opt.epochs or stop:
        save_run_checkpoint(wdir / "last.pt", run, epoch, run["best_fitness"])
        if run["best_fitness"] == fit:
            save_run_checkpoint(wdir / "best.pt", run, epoch, run["best_fitness"])
        if opt.save_period > 0 and epoch % opt.save_period == 0:
            save_run_checkpoint(wdir / f"epoch{epoch}.pt", run, epoch, run["best_fitness"])
    return stop


def _broadcast_stop(stop: bool) -> bool:
    """Share rank 0's early-stop decision with every DDP rank."""
    if RANK == -1:
        return stop
    flag = [stop]
    torch.distributed.broadcast_object_list(flag, 0)
    return bool(flag[0])


def _finish(run: dict, opt: argparse.Namespace, t0: float, epochs_done: int) -> Path:
    """Final validation of best.pt with plots, results.png, and the closing log lines (rank 0)."""
    save_dir = run["save_dir"]
    if RANK not in (-1, 0):
        return save_dir / "weights" / "last.pt"
    LOGGER.info(f"\n{epochs_done} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
    best = save_dir / "weights" / "best.pt"
    if best.exists() and not opt.noval:
        from utils.checkpoint import load_model

        LOGGER.info(f"\nValidating {best}...")
        validate.run(data=run["data"], batch_size=run["batch"] * 2, imgsz=opt.imgsz, model=load_model(best, run["device"]).fuse(),
                     single_cls=opt.single_cls, dataloader=run["val_loader"], save_dir=save_dir, plots=not opt.noplots,
                     verbose=True, half=run["device"].type == "cuda")
    if not opt.noplots and (save_dir / "results.csv").exists():
        from utils.plots import plot_results

        plot_results(save_dir / "results.csv")
    LOGGER.info(f"Results saved to {save_dir}")
    return best if best.exists() else save_dir / "weights" / "last.pt"


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's train.py flags (plus --backbone-weights and --close-mosaic)."""
    p = argparse.ArgumentParser(description="Train a YOLOv5-style detector")
    p.add_argument("--weights", default="", help="initial weights (.pt checkpoint) for fine-tuning")
    p.add_argument("--cfg", default="", help=f"model yaml (default {DEFAULT_CFG} when no --weights)")
    p.add_argument("--data", default=None, help="dataset yaml (default: embedded shapes dataset)")
    p.add_argument("--hyp", default=str(DEFAULT_HYP), help="hyperparameters yaml")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs, -1 for autobatch")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent (or given) last.pt")
    p.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate final epoch")
    p.add_argument("--noautoanchor", action="store_true")
    p.add_argument("--noplots", action="store_true")
    p.add_argument("--cache", nargs="?", const="ram", default=None, choices=("ram", "disk"), help="image cache")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--single-cls", action="store_true")
    p.add_argument("--optimizer", default="SGD", choices=("SGD", "Adam", "AdamW"))
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm, DDP only")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per rank)")
    p.add_argument("--project", default=str(ROOT / "runs/train"))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--cos-lr", action="store_true")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=100, help="early stopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze first N layers, or layer indices")
    p.add_argument("--save-period", type=int, default=-1, help="save a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--close-mosaic", type=int, default=0, help="turn mosaic off for the last N epochs")
    p.add_argument("--backbone-weights", default="", help="ImageNet backbone weights: file path or timm:<name>")
    return p.parse_args(argv)


def resume_options(opt: argparse.Namespace) -> argparse.Namespace:
    """Options of the run being resumed (from its last.pt), pointing at that checkpoint."""
    if opt.resume is True:
        found = sorted(Path(opt.project).glob("**/last.pt"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise TrainError(f"--resume: no last.pt found under {opt.project}")
        path = found[-1]
    else:
        path = Path(opt.resume)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("opt"), dict):
        raise TrainError(f"{path}: checkpoint has no training options; it cannot be resumed")
    resumed = argparse.Namespace(**{**vars(opt), **ckpt["opt"]})
    resumed.resume, resumed.cfg, resumed.weights = str(path), "", ""
    resumed.save_dir = str(_recorded_run_dir(path, ckpt["opt"]))
    resumed.hyp = ckpt["opt"].get("hyp_file", resumed.hyp)
    return resumed


def _recorded_run_dir(path: Path, opt: dict) -> Path:
    """The run folder the checkpoint was trained in: the only place a resume writes to; refused when it is gone."""
    save_dir = opt.get("save_dir")
    if not isinstance(save_dir, str) or not save_dir:
        raise TrainError(f"{path}: checkpoint does not record its run folder; start a new run with --weights {path} instead")
    run_dir = Path(save_dir)
    if not (run_dir / "opt.yaml").is_file():
        raise TrainError(f"{path}: its run folder {run_dir} no longer exists (no opt.yaml there); "
                         f"start a new run with --weights {path} instead")
    return run_dir


def init_distributed(opt: argparse.Namespace) -> torch.device:
    """Device for this process; under torchrun, joins the process group (NCCL on GPU, gloo on CPU)."""
    if LOCAL_RANK == -1:
        return select_device(opt.device)
    if opt.batch_size % WORLD_SIZE:
        raise TrainError(f"--batch-size {opt.batch_size} must be a multiple of the {WORLD_SIZE} DDP processes")
    use_cuda = torch.cuda.is_available() and opt.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(LOCAL_RANK)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", LOCAL_RANK) if use_cuda else torch.device("cpu")


def check_options(opt: argparse.Namespace) -> None:
    """Reject values that cannot train, before any folder is created (one line naming the flag)."""
    check_int("--epochs", opt.epochs)
    check_int("--batch-size", opt.batch_size, allow=(-1,))
    check_img_size(opt.imgsz)
    check_int("--workers", opt.workers, minimum=0)
    check_int("--patience", opt.patience, minimum=0)
    check_int("--close-mosaic", opt.close_mosaic, minimum=0)
    for i in opt.freeze:
        check_int("--freeze", i, minimum=0)


def main(opt: argparse.Namespace) -> Path:
    """Resolve options, prepare the run folder and train."""
    set_logging(rank=RANK)
    check_options(opt)
    if opt.resume:
        opt = resume_options(opt)
    else:
        opt.cfg = opt.cfg or ("" if opt.weights else DEFAULT_CFG)
        opt.hyp_file = str(opt.hyp)
        opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok).resolve())  # resume finds it from any cwd
    if opt.batch_size == -1:
        from utils.engine.torch_utils import auto_batch_size

        opt.batch_size = auto_batch_size(opt)
    device = init_distributed(opt)
    try:
        return train(opt, device)
    finally:
        if LOCAL_RANK != -1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(**kwargs: Any) -> Path:
    """Python entry point: train.run(cfg='models/yolov5_mobilenetv4.yaml', epochs=3, imgsz=320); returns best.pt."""
    opt = parse_opt([])
    for k, v in kwargs.items():
        if not hasattr(opt, k):
            raise TrainError(f"train.run: unknown option {k!r}")
        setattr(opt, k, v)
    return main(opt)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: every expected failure ends in one 'train: error: ...' line."""
    with error_boundary("train", extra=(NonFiniteLossError,)):
        main(parse_opt(argv))


if __name__ == "__main__":
    cli()
