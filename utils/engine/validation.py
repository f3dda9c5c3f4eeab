"""What val.py and the task scripts' val.py run: open the weights, build the validation loader, score a pass and report it.

The task follows the model (utils.tasks.task_of): its data, loader, evaluator and loop, e.g. boxes and masks for a Segment head.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cli import check_fraction, check_img_size, check_int
from utils.device import select_device
from utils.paths import ROOT, increment_path
from utils.tasks import Task, check_script_task, get_task

LOGGER = logging.getLogger("mobile_yolo")


def _load_backend(weights: Any, device: torch.device, half: bool) -> Any:
    """Open the weights through the one inference backend (.pt, ONNX, TorchScript, OpenVINO)."""
    from utils.runtime.backend import DetectBackend

    return DetectBackend(weights[0] if isinstance(weights, (list, tuple)) else weights, device=device, fp16=half)


def _make_loader(task: Task, data: dict, split: str, imgsz: int, batch_size: int, stride: int, pt: bool, single_cls: bool,
                 workers: int) -> Any:
    """The task's validation loader for the split `split` (val.py --task; speed: square, unpadded batches)."""
    name = split if split in ("train", "val", "test") and data.get(split) else "val"
    pad, rect = (0.0, False) if split == "speed" else (0.5, pt)
    return task.val_loader(data, name, imgsz, batch_size, stride, rect=rect, single_cls=single_cls, workers=workers, pad=pad)


def report(result: Any, verbose: bool) -> None:
    """Log the result's own table (its task's metrics; per class when verbose) and the warning YOLOv5 gives when the split
    has no labels: what val.py prints, and the Trainer after each epoch's validation."""
    for line in result.table(verbose):
        LOGGER.info(line)
    if result.instances.sum() == 0:
        LOGGER.warning("WARNING: no labels found in the validation set, cannot compute metrics without labels")


def _open_model(weights: Any, device: str, half: bool, opts: dict[str, Any]) -> tuple[Any, torch.device, bool]:
    """Check the options, pick the device and open the weights (before any run folder exists)."""
    check_options(**opts)
    dev = select_device(device)
    if half and dev.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; running in float32")
        half = False
    return _load_backend(weights, dev, half), dev, half


@torch.no_grad()
def run(
    data: Any = None,
    weights: Any = None,
    batch_size: int = 32,
    imgsz: int = 640,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    task: str = "val",
    device: str = "",
    workers: int = 8,
    single_cls: bool = False,
    augment: bool = False,
    verbose: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    project: Any = ROOT / "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    half: bool = False,
    model: Any = None,
    dataloader: Any = None,
    save_dir: Any = None,
    plots: bool = True,
    compute_loss: Any = None,
    quiet: bool = False,
    script_task: str = "detect",
) -> tuple[tuple[float, ...], np.ndarray, tuple[float, float, float]]:
    """Validate; returns ((P, R, mAP50, mAP50-95, 3 loss items), per-class mAP50-95, ms per image). script_task: the
    task whose script runs this (segment/val.py: 'segment'); weights of a task its scripts do not run are refused."""
    in_process = model is not None  # model= and dataloader= given by Python callers
    if in_process:
        net, dev = model, next(model.parameters()).device
    else:
        opts = dict(batch_size=batch_size, imgsz=imgsz, workers=workers, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
        net, dev, half = _open_model(weights, device, half, opts)
    model_task = check_script_task(get_task(script_task), net, "val", weights[0] if isinstance(weights, (list, tuple)) else weights)
    data = model_task.load_data(data)
    names = list(data["names"]) if not single_cls else ["item"]
    if in_process:
        save_dir = Path(save_dir) if save_dir is not None else Path(".")
    else:
        imgsz = check_img_size(imgsz, int(net.stride))
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)  # only once model and data loaded
        if not net.pt:
            batch_size = 1 if not getattr(net, "dynamic", True) else batch_size
        rect = bool(net.pt or net.dynamic)  # rectangular batches need an input shape that can change
        dataloader = _make_loader(model_task, data, task, imgsz, batch_size, int(net.stride), rect, single_cls, workers)
        names = names if single_cls else (list(net.names) if len(net.names) == len(names) else names)
    json_name = f"{Path(str(weights[0] if isinstance(weights, (list, tuple)) else weights or 'model')).stem}_predictions.json"
    model_task.warn_output_cap(net, {f"{task} split": getattr(dataloader, "dataset", None)})
    evaluator = model_task.evaluator(len(names), names)
    result = model_task.validate(net, dataloader, evaluator, device=dev, conf_thres=conf_thres, iou_thres=iou_thres,
                      max_det=max_det, half=half, augment=augment, single_cls=single_cls, compute_loss=compute_loss, plots=plots,
                      save_dir=save_dir, save_txt=save_txt, save_conf=save_conf, save_json=save_json, json_name=json_name, names=names,
                      quiet=quiet)
    report(result, verbose or (not in_process and len(names) < 50))
    if not in_process:
        shape = (batch_size, 3, imgsz, imgsz)
        stage = model_task.postprocess_stage
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms {stage} per image at shape {shape}" % result.speed)
    if save_json and (save_dir / json_name).exists():
        from utils.evaluation.coco_eval import evaluate_dataset_json

        coco = evaluate_dataset_json(dataloader.dataset, names, save_dir / json_name, save_dir)
        result = dataclasses.replace(result, map=coco[0], map50=coco[1]) if coco is not None else result
    if not in_process:
        LOGGER.info(f"Results saved to {save_dir}")
    row = result.results_row()  # the task's metric columns (box P R mAP50 mAP50-95, then mask ones...) and the loss items
    if not result.loss:  # YOLOv5 always returned its loss entries (three for detection, four for segmentation)
        row = (*row, *(0.0,) * model_task.val_loss_width)
    return row, result.maps, result.speed


def check_options(batch_size: int, imgsz: int, workers: int, conf_thres: float, iou_thres: float, max_det: int) -> None:
    """Reject values that cannot validate (one line naming the flag) before any folder is created."""
    check_int("--batch-size", batch_size)
    check_img_size(imgsz)
    check_int("--workers", workers, minimum=0)
    check_fraction("--conf-thres", conf_thres)
    check_fraction("--iou-thres", iou_thres)
    check_int("--max-det", max_det)


def study(**kwargs: Any) -> Path:
    """--task study: mAP and speed against image size, saved as study_<weights>.txt."""
    out = Path(kwargs.get("project", ROOT / "runs/val")) / f"study_{Path(str(kwargs['weights'])).stem}.txt"
    rows = []
    for size in range(256, 1536 + 128, 128):
        kwargs.update(imgsz=size, plots=False)
        results, _, speed = run(**kwargs)
        rows.append([size, *results[:4], *speed])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(out, np.array(rows), fmt="%10.4g")
    LOGGER.info(f"study saved to {out}")
    return out




def val_parser(task: str = "detect") -> argparse.ArgumentParser:
    """YOLOv5's val.py flags with the task's defaults (segment/val.py: a segmentation model and dataset by default)."""
    t = get_task(task)
    p = argparse.ArgumentParser(description=f"Validate a {t.what} (metrics, speed) on a dataset")
    p.add_argument("--data", default=t.default_data, help="dataset (default: the task's embedded shapes dataset)")
    default_weights = str(ROOT / t.train_project / "exp/weights/best.pt")
    p.add_argument("--weights", nargs="+", default=[default_weights], help=".pt, .onnx, .torchscript or OpenVINO dir")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640)
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.6)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--task", default="val", choices=("train", "val", "test", "speed", "study"))
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--single-cls", action="store_true")
    p.add_argument("--augment", action="store_true", help="test-time augmentation")
    p.add_argument("--verbose", action="store_true", help="per-class table")
    p.add_argument("--save-txt", action="store_true")
    p.add_argument("--save-conf", action="store_true")
    p.add_argument("--save-json", action="store_true", help="COCO-format predictions (+ pycocotools mAP)")
    p.add_argument("--project", default=str(ROOT / t.val_project))
    t.add_val_args(p)
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    p.set_defaults(script_task=t.name)  # the weights are checked against the script's task
    return p


def val_main(opt: argparse.Namespace) -> None:
    """Run the parsed command: every weights file, as a validation, a speed run or a study."""
    kwargs = vars(opt)
    if opt.task == "speed":
        kwargs.update(conf_thres=0.25, iou_thres=0.45, plots=False, save_json=False)
    weights = kwargs.pop("weights")
    for w in weights:
        if opt.task == "study":
            study(weights=w, **kwargs)
        else:
            run(weights=w, **kwargs)
