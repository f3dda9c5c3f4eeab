"""Validate a detector on a YOLO-format dataset: python val.py --weights best.pt --data data/shapes.yaml."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.cli import check_fraction, check_img_size, check_int, error_boundary
from utils.data.dataset_config import load_dataset_config
from utils.engine.torch_utils import select_device
from utils.evaluation.metrics import ConfusionMatrix, ap_per_class, match_predictions
from utils.files import safe_component
from utils.logs import set_logging
from utils.nms import non_max_suppression
from utils.paths import ROOT, increment_path

LOGGER = logging.getLogger("mobile_yolo")
IOUV = torch.linspace(0.5, 0.95, 10)
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


@dataclass
class ValState:
    """Everything accumulated over the validation batches."""

    stats: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    jdict: list[dict] = field(default_factory=list)
    seen: int = 0
    times: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(3))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, state: ValState, slot: int, device: torch.device):  # type: ignore[no-untyped-def]
    """Run fn() and add its wall time (seconds) to state.times[slot]."""
    _synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    _synchronize(device)
    state.times[slot] += time.perf_counter() - t0
    return out


def image_stats(pred: torch.Tensor, labels: torch.Tensor, img_shape: tuple, shapes: tuple, cm: ConfusionMatrix | None) -> tuple:
    """Match one image's detections (letterboxed pixels) against its labels in original-image pixels."""
    nl, npr = labels.shape[0], pred.shape[0]
    correct = torch.zeros(npr, len(IOUV), dtype=torch.bool)
    if npr == 0:
        if nl and cm is not None:
            cm.process_batch(None, labels[:, 0])
        return correct, torch.zeros(0), torch.zeros(0), labels[:, 0], pred
    predn = pred.clone()
    scale_boxes(img_shape, predn[:, :4], shapes[0], shapes[1])
    if nl:
        tbox = xywh2xyxy(labels[:, 1:5])
        scale_boxes(img_shape, tbox, shapes[0], shapes[1])
        labelsn = torch.cat((labels[:, 0:1], tbox), 1)
        correct = match_predictions(predn, labelsn, IOUV)
        if cm is not None:
            cm.process_batch(predn, labelsn)
    return correct, pred[:, 4], pred[:, 5], labels[:, 0], predn


def save_txt(predn: torch.Tensor, save_conf: bool, shape: tuple, file: Path) -> None:
    """Write `class cx cy w h [conf]` lines normalised to the original image."""
    gn = torch.tensor(shape)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in predn.tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
        row = (int(cls), *xywh, conf) if save_conf else (int(cls), *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(line + "\n" for line in lines))


def json_records(predn: torch.Tensor, image_id: int) -> list[dict]:
    """COCO result records for one image (bbox as top-left x, y, w, h in pixels)."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    return [
        {"image_id": image_id, "category_id": int(p[5]), "bbox": [round(x, 3) for x in b], "score": round(p[4], 5)}
        for p, b in zip(predn.tolist(), box.tolist())
    ]


def _load_backend(weights: Any, device: torch.device, half: bool) -> Any:
    """Open the weights through the one inference backend (.pt, ONNX, TorchScript, OpenVINO)."""
    from utils.export.backend import DetectBackend

    return DetectBackend(weights[0] if isinstance(weights, (list, tuple)) else weights, device=device, fp16=half)


def _make_loader(data: dict, task: str, imgsz: int, batch_size: int, stride: int, pt: bool, single_cls: bool, workers: int):  # type: ignore[no-untyped-def]
    """Rectangular, padded validation dataloader for the split `task`."""
    from utils.data.datasets import create_dataloader

    split = task if task in ("train", "val", "test") and data.get(task) else "val"
    pad, rect = (0.0, False) if task == "speed" else (0.5, pt)
    loader, _ = create_dataloader(
        data[split], imgsz, batch_size, stride, single_cls=single_cls, pad=pad, rect=rect, workers=workers,
        prefix=f"{split}: ", nc=int(data["nc"]),
    )
    return loader


def _run_batches(
    model: Any, loader: Any, device: torch.device, opts: dict, names: list[str], compute_loss: Any
) -> tuple[ValState, ConfusionMatrix]:
    """Inference + NMS + matching over the whole loader."""
    state, cm = ValState(), ConfusionMatrix(nc=len(names))
    half = opts["half"]
    for im, targets, paths, shapes in tqdm(loader, desc=f"{'':>22}{'Images':>11}{'Instances':>11}", leave=False, disable=opts["quiet"]):
        im = _timed(lambda im=im: (im.to(device).half() if half else im.to(device).float()) / 255, state, 0, device)
        targets = targets.to(device)
        nb, _, height, width = im.shape
        out = _timed(lambda im=im: model(im, augment=opts["augment"]) if opts["augment"] else model(im), state, 1, device)
        preds, raw = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        if compute_loss is not None and raw is not None:
            state.loss += compute_loss([x.float() for x in raw], targets)[1].cpu()
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        preds = _timed(lambda p=preds: non_max_suppression(p, opts["conf_thres"], opts["iou_thres"], multi_label=True,
                                                            agnostic=opts["single_cls"], max_det=opts["max_det"]), state, 2, device)
        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:].cpu()
            path, shape = Path(paths[si]), shapes[si]
            state.seen += 1
            if opts["single_cls"]:
                pred[:, 5] = 0
            correct, conf, pcls, tcls, predn = image_stats(pred.float().cpu(), labels, im[si].shape[1:], shape, cm)
            state.stats.append((correct, conf, pcls, tcls))
            if opts["save_txt"]:
                save_txt(predn, opts["save_conf"], shape[0], opts["save_dir"] / "labels" / f"{safe_component(path.stem)}.txt")
            if opts["save_json"]:
                state.jdict.extend(json_records(predn, opts["image_ids"].get(str(paths[si]), state.seen - 1)))
        if opts["plots"] and loader.batch_size and state.seen <= 3 * loader.batch_size:
            _plot_batch(im, targets, preds, paths, names, opts["save_dir"], (state.seen - 1) // max(nb, 1))
    return state, cm


def _plot_batch(
    im: torch.Tensor, targets: torch.Tensor, preds: list[torch.Tensor], paths: list, names: list[str], save_dir: Path, i: int
) -> None:
    """val_batch{i}_labels.jpg and val_batch{i}_pred.jpg for the first three batches."""
    from utils.plots import plot_images

    if i > 2:
        return
    h, w = im.shape[2:]
    gt = targets.clone().cpu()
    plot_images(im, gt, paths, save_dir / f"val_batch{i}_labels.jpg", names)
    rows = []
    for si, p in enumerate(preds):
        p = p[:300].float().cpu()
        xywh = xyxy2xywh(p[:, :4])
        rows.append(torch.cat((torch.full((len(p), 1), float(si)), p[:, 5:6], xywh, p[:, 4:5]), 1))
    pred_t = torch.cat(rows, 0) if rows else torch.zeros(0, 7)
    plot_images(im, pred_t, paths, save_dir / f"val_batch{i}_pred.jpg", names)


def _compute_metrics(state: ValState, names: list[str], save_dir: Path, plots: bool) -> dict[str, Any]:
    """Per-class P, R, AP50, AP50-95 from the accumulated matches."""
    nc = len(names)
    stats = [torch.cat(x, 0).numpy() for x in zip(*state.stats)] if state.stats else [np.zeros((0, 10), bool)] + [np.zeros(0)] * 3
    nt = np.bincount(stats[3].astype(int), minlength=nc)
    out = {"mp": 0.0, "mr": 0.0, "map50": 0.0, "map": 0.0, "nt": nt, "ap_class": np.zeros(0, int), "maps": np.zeros(nc)}
    if len(stats[0]) and stats[0].any():
        _, _, p, r, _, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=dict(enumerate(names)))
        ap50, ap = ap[:, 0], ap.mean(1)
        out.update(mp=float(p.mean()), mr=float(r.mean()), map50=float(ap50.mean()), map=float(ap.mean()), ap_class=ap_class)
        out.update(p=p, r=r, ap50=ap50, ap=ap)
        out["maps"][ap_class] = ap
    out["maps"] = np.where(out["maps"] == 0, out["map"], out["maps"])
    return out


def _print_table(m: dict[str, Any], seen: int, names: list[str], verbose: bool) -> None:
    """The YOLOv5 results table: an 'all' row, then one row per class when verbose."""
    LOGGER.info(("%22s" + "%11s" * 6) % TABLE_HEADER)
    fmt = "%22s" + "%11i" * 2 + "%11.3g" * 4
    LOGGER.info(fmt % ("all", seen, m["nt"].sum(), m["mp"], m["mr"], m["map50"], m["map"]))
    if m["nt"].sum() == 0:
        LOGGER.warning("WARNING: no labels found in the validation set, cannot compute metrics without labels")
    if verbose and len(names) > 1:
        for i, c in enumerate(m["ap_class"]):
            LOGGER.info(fmt % (names[c], seen, m["nt"][c], m["p"][i], m["r"][i], m["ap50"][i], m["ap"][i]))


def _coco_eval(state: ValState, dataset: Any, names: list[str], save_dir: Path, weights: Any) -> tuple[float, float] | None:
    """Write predictions JSON and, when pycocotools is installed, score them against the converted labels."""
    pred_json = save_dir / f"{Path(str(weights or 'model')).stem}_predictions.json"
    pred_json.write_text(json.dumps(state.jdict))
    LOGGER.info(f"Saved {len(state.jdict)} predictions to {pred_json}")
    try:
        from utils.evaluation.coco_eval import evaluate_coco, yolo_to_coco_gt

        shapes = [(int(h), int(w)) for h, w in dataset.img_shapes]
        gt = yolo_to_coco_gt(dataset.im_files, [lb[:, :5] for lb in dataset.labels], shapes, names)
        (save_dir / "ground_truth_coco.json").write_text(json.dumps(gt))
        map_, map50 = evaluate_coco(gt, state.jdict)
    except ImportError as e:
        LOGGER.warning(f"pycocotools evaluation skipped: {e}")
        return None
    LOGGER.info(f"pycocotools: mAP50-95 {map_:.4f}, mAP50 {map50:.4f}")
    return map_, map50


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
) -> tuple[tuple[float, ...], np.ndarray, tuple[float, float, float]]:
    """Validate; returns ((P, R, mAP50, mAP50-95, box, obj, cls losses), per-class mAP50-95, ms per image)."""
    training = model is not None
    data = load_dataset_config(data)
    names = list(data["names"]) if not single_cls else ["item"]
    if training:
        dev = next(model.parameters()).device
        half = half and dev.type == "cuda"
        net = model.half() if half else model.float()
        save_dir = Path(save_dir) if save_dir is not None else Path(".")
    else:
        check_options(batch_size=batch_size, imgsz=imgsz, workers=workers, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
        dev = select_device(device)
        if half and dev.type != "cuda":
            LOGGER.warning("WARNING: --half needs a CUDA device; running in float32")
            half = False
        net = _load_backend(weights, dev, half)
        imgsz = check_img_size(imgsz, int(net.stride))
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)  # only once the model loaded
        if not net.pt:
            batch_size = 1 if not getattr(net, "dynamic", True) else batch_size
        rect = bool(net.pt or net.dynamic)  # rectangular batches need an input shape that can change
        dataloader = _make_loader(data, task, imgsz, batch_size, int(net.stride), rect, single_cls, workers)
        names = names if single_cls else (list(net.names) if len(net.names) == len(names) else names)
    net.eval()
    opts = dict(half=half, augment=augment, conf_thres=conf_thres, iou_thres=iou_thres, single_cls=single_cls, max_det=max_det,
                save_txt=save_txt, save_conf=save_conf, save_json=save_json, save_dir=save_dir, plots=plots, quiet=quiet,
                image_ids={str(f): i for i, f in enumerate(getattr(dataloader.dataset, "im_files", []))})
    state, cm = _run_batches(net, dataloader, dev, opts, names, compute_loss)
    m = _compute_metrics(state, names, save_dir, plots)
    _print_table(m, state.seen, names, verbose or (not training and len(names) < 50))
    speed = tuple(t / max(state.seen, 1) * 1e3 for t in state.times)
    if not training:
        shape = (batch_size, 3, imgsz, imgsz)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % speed)
    if plots:
        cm.plot(save_dir=save_dir, names=names)
    if save_json and state.jdict:
        coco = _coco_eval(state, dataloader.dataset, names, save_dir, weights)
        if coco is not None:
            m["map"], m["map50"] = coco
    if not training:
        LOGGER.info(f"Results saved to {save_dir}")
    if training:
        net.float()
    loss = (state.loss / max(len(dataloader), 1)).tolist()
    return (m["mp"], m["mr"], m["map50"], m["map"], *loss), m["maps"], speed


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


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """YOLOv5's val.py flags."""
    p = argparse.ArgumentParser(description="Validate a detector (mAP, speed) on a YOLO-format dataset")
    p.add_argument("--data", default=None, help="dataset yaml (default: the embedded shapes dataset)")
    default_weights = str(ROOT / "runs/train/exp/weights/best.pt")
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
    p.add_argument("--project", default=str(ROOT / "runs/val"))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opt = parse_opt(argv)
    set_logging()
    kwargs = vars(opt)
    with error_boundary("val"):
        if opt.task == "speed":
            kwargs.update(conf_thres=0.25, iou_thres=0.45, plots=False, save_json=False)
        weights = kwargs.pop("weights")
        for w in weights:
            if opt.task == "study":
                study(weights=w, **kwargs)
            else:
                run(weights=w, **kwargs)


if __name__ == "__main__":
    main()
