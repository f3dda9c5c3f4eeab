"""Training options: YOLOv5's train.py flags, their checks, and the options of a run being resumed."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.limits import DEFAULT_MAX_PARAMS, PARAMS_ENV
from utils.checkpoint import read_checkpoint
from utils.cli import check_img_size, check_int, shell_command
from utils.engine.config import TrainConfig
from utils.engine.recipe import RECIPES
from utils.engine.trainer import TrainError
from utils.paths import ROOT
from utils.tasks import get_task

DEFAULT_CFG = get_task("detect").default_cfg


def train_options(task: str = "detect", **overrides: object) -> TrainConfig:
    """Default options of `task` with some replaced (Python callers: benchmarks, tests); unknown names raise TrainError.
    save_dir is left empty: train_main derives it from project/name (Python callers may give it directly)."""
    defaults = vars(train_parser(task).parse_args([]))
    unknown = sorted(set(overrides) - set(defaults) - {"save_dir"})
    if unknown:
        raise TrainError(f"unknown training option {unknown[0]!r}")
    return TrainConfig.from_dict({**defaults, "save_dir": "", **overrides})


def train_parser(task: str = "detect") -> argparse.ArgumentParser:
    """YOLOv5's train.py flags (plus --backbone-weights and --close-mosaic) with the task's defaults and its own flags
    (segment: segment/train.py's --mask-ratio, --no-overlap); unknown tasks raise ValueError."""
    t = get_task(task)
    p = argparse.ArgumentParser(description=f"Train a YOLOv5-style {t.what}")
    p.set_defaults(task=task)
    p.add_argument("--weights", default="", help="initial weights (.pt checkpoint) for fine-tuning")
    p.add_argument("--cfg", default="", help=f"model yaml (default {t.default_cfg} when no --weights)")
    p.add_argument("--data", default=t.default_data, help="dataset (default: the task's embedded shapes dataset)")
    p.add_argument("--hyp", default="", help="hyperparameters yaml (default: data/hyps/hyp.scratch-low.yaml, hyp.scratch-af.yaml "
                   "for anchor-free heads, hyp.rtdetr.yaml for RT-DETR)")
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
    p.add_argument("--optimizer", default="auto", choices=("auto", "SGD", "Adam", "AdamW"),
                   help="auto: the head's recipe (AdamW for RT-DETR, else SGD)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm, DDP on CUDA only")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per rank)")
    p.add_argument("--project", default=str(ROOT / t.train_project))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--cos-lr", action="store_true")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=100, help="early stopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze first N layers, or layer indices")
    p.add_argument("--save-period", type=int, default=-1, help="save a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--close-mosaic", type=int, default=0, help="turn mosaic off for the last N epochs")
    p.add_argument("--recipe", default="auto", choices=RECIPES,
                   help="schedule: small (optimizer steps, for < 1000 images), yolov5 (nominal batch 64), auto picks by size")
    p.add_argument("--backbone-weights", default="", help="ImageNet backbone weights: file path or timm:<name>")
    p.add_argument("--max-params", type=int, default=None,
                   help=f"refuse a model config with more parameters (default {DEFAULT_MAX_PARAMS:,}, or ${PARAMS_ENV})")
    p.add_argument("--evolve", type=int, nargs="?", const=300, default=None,
                   help="evolve hyperparameters for N generations (300 if N is omitted); results in <project>/../evolve/<name>")
    p.add_argument("--image-weights", action="store_true", help="draw training images by weights from class rarity and per-class mAP")
    p.add_argument("--quad", action="store_true", help="four-image collate: each 4 images become one of twice the size")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass (slow first steps, then faster)")
    t.add_train_args(p)
    return p


def resume_options(opt: TrainConfig | argparse.Namespace) -> TrainConfig:
    """Options of the run being resumed (from its last.pt), pointing at that checkpoint."""
    opt = TrainConfig.of(opt)
    if opt.resume is True:
        found = sorted(Path(opt.project).glob("**/last.pt"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise TrainError(f"--resume: no last.pt found under {opt.project}")
        path = found[-1]
    else:
        path = Path(str(opt.resume))
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("opt"), dict):
        raise TrainError(f"{path}: checkpoint has no training options; it cannot be resumed")
    return TrainConfig.from_dict({**opt.as_dict(), **ckpt["opt"], "resume": str(path), "cfg": "", "weights": "",
                                  "save_dir": str(_recorded_run_dir(path, ckpt["opt"]))})


def _recorded_run_dir(path: Path, opt: dict) -> Path:
    """The run folder the checkpoint was trained in: the only place a resume writes to; refused when it is gone."""
    save_dir = opt.get("save_dir")
    if not isinstance(save_dir, str) or not save_dir:
        raise TrainError(f"{path}: checkpoint does not record its run folder; "
                         f"start a new run with {shell_command('--weights', path)} instead")
    run_dir = Path(save_dir)
    if not (run_dir / "opt.yaml").is_file():
        raise TrainError(f"{path}: its run folder {run_dir} no longer exists (no opt.yaml there); "
                         f"start a new run with {shell_command('--weights', path)} instead")
    return run_dir


def check_options(opt: TrainConfig, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Reject values that cannot train, before any folder is created (one line naming the flag); world_size: DDP processes,
    local_world_size: those on this machine (default world_size)."""
    check_int("--epochs", opt.epochs)
    check_int("--batch-size", opt.batch_size, allow=(-1,))
    check_img_size(opt.imgsz)
    check_int("--workers", opt.workers, minimum=0)
    check_int("--patience", opt.patience, minimum=0)
    check_int("--close-mosaic", opt.close_mosaic, minimum=0)
    for i in opt.freeze:
        check_int("--freeze", i, minimum=0)
    _check_sampling_flags(opt, world_size)
    check_launch_flags(opt, world_size, local_world_size)


def _check_sampling_flags(opt: TrainConfig, world_size: int) -> None:
    """--evolve, --image-weights and --quad: the combinations that cannot work."""
    if opt.evolve is not None:
        check_int("--evolve", opt.evolve)
        if opt.resume:
            raise TrainError("--evolve cannot be combined with --resume; to continue an evolution, run the same command "
                             "with --name <its folder> --exist-ok")
    single = {"--evolve": opt.evolve is not None, "--image-weights": opt.image_weights}
    for flag, on in single.items():
        if on and world_size > 1:
            raise TrainError(f"{flag} is not supported with DDP ({world_size} processes); run it in a single process")
    if opt.image_weights and opt.rect:
        raise TrainError("--image-weights cannot be combined with --rect (weighted draws mix images of different rectangular batches)")


def device_ids(device: object) -> list[int] | None:
    """The CUDA indices a --device value lists ('0,1', 'cuda:0'), or None for '', 'cuda', 'cpu', 'mps' and values that
    select_device refuses."""
    spec = str(device if device is not None else "").strip().lower().replace("cuda:", "").replace(" ", "")
    ids = spec.split(",")
    return [int(i) for i in ids] if spec and all(i.isdigit() for i in ids) else None


def _trains_on_cpu(device: object) -> bool:
    """Whether --device puts training on the CPU: 'cpu', or the default ('' / 'cuda') on a machine without CUDA."""
    spec = str(device if device is not None else "").strip().lower()
    return spec == "cpu" or (spec in ("", "cuda") and not torch.cuda.is_available())


def check_launch_flags(opt: TrainConfig, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Refuse, in one line naming the flags, what cannot work under DDP (every rank decides alike, before any joins the
    process group): --sync-bn on the CPU, AutoBatch, a batch that does not split evenly, MPS, and a --device that does
    not give each of this machine's processes its own visible GPU."""
    if world_size <= 1:
        return  # a single process: select_device checks --device, and --sync-bn does nothing (as in YOLOv5)
    if opt.sync_bn and _trains_on_cpu(opt.device):
        where = "--device cpu" if str(opt.device).strip().lower() == "cpu" else "this machine has no CUDA device"
        raise TrainError(f"--sync-bn needs CUDA (SyncBatchNorm runs on GPUs only) but {where}; drop --sync-bn or train on GPUs")
    ddp = f"DDP ({world_size} processes)"
    if opt.batch_size == -1:
        raise TrainError(f"--batch-size -1 (AutoBatch) is not supported with {ddp}; give the total batch size")
    if opt.batch_size % world_size:
        raise TrainError(f"--batch-size {opt.batch_size} must be a multiple of the {world_size} DDP processes")
    if str(opt.device).strip().lower() == "mps":
        raise TrainError(f"--device mps is not supported with {ddp}; use CUDA devices or --device cpu")
    _check_ddp_gpus(opt.device, world_size if local_world_size is None else local_world_size, ddp)


def _check_ddp_gpus(device: object, local: int, ddp: str) -> None:
    """Each of the `local` DDP processes on this machine needs its own visible GPU: the ones --device lists, else all."""
    if _trains_on_cpu(device):
        return
    ids = device_ids(device)
    spec = str(device).strip()
    if ids is None and spec.lower() not in ("", "cuda"):
        raise TrainError(f"--device {spec}: expected 'cpu' or CUDA indices such as 0 or 0,1 with {ddp}")
    if not torch.cuda.is_available():
        raise TrainError(f"--device {spec} requested with {ddp} but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    missing = [i for i in ids or [] if i >= count]
    if missing:
        raise TrainError(f"--device {spec} requested with {ddp} but only {count} CUDA device(s) are visible")
    if len(set(ids or range(count))) < local:
        shown = f"--device {spec} lists" if ids else "this machine has"
        n = len(set(ids or range(count)))
        raise TrainError(f"{shown} {n} GPU(s) but torchrun starts {local} DDP processes on this machine; give each process "
                         f"its own GPU (--nproc_per_node {n})")
