"""What classify/predict.py runs: open a source, classify each image (centre view, as validated), draw and save the top 5."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.cli import check_img_size, check_int
from utils.data.classify_augment import centre_crop
from utils.data.images import VID_FORMATS, check_some_succeeded, skip_failed_image
from utils.device import select_device
from utils.files import safe_component
from utils.inference.predict import VideoSink, check_imshow, default_source, show_and_save
from utils.inference.predictor import item_name, open_source
from utils.paths import ROOT, increment_path
from utils.plots import class_color
from utils.tasks import check_script_task, get_task
from utils.tasks.classify import ClassifyTask

LOGGER = logging.getLogger("mobile_yolo")
TOP = 5


def classify_input(im0: np.ndarray, size: int, device: torch.device, half: bool) -> torch.Tensor:
    """A BGR image -> (1, 3, size, size) 0-1 RGB tensor of its centre square (the validation view)."""
    rgb = cv2.cvtColor(centre_crop(im0, size), cv2.COLOR_BGR2RGB)
    t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(device)[None]
    return (t.half() if half else t.float()) / 255


def top_classes(probs: torch.Tensor, names: list[str], k: int = TOP) -> list[tuple[str, float]]:
    """The k most probable (name, probability) pairs of one (nc,) probability vector, best first."""
    p, i = probs.float().topk(min(k, probs.numel()))
    return [(names[j] if j < len(names) else str(j), float(v)) for v, j in zip(p.tolist(), i.tolist())]


def draw_top(im0: np.ndarray, top: list[tuple[str, float]], line_width: int = 2) -> np.ndarray:
    """Copy of the image with its top classes written down the top-left corner ('circle 0.93')."""
    out = np.ascontiguousarray(im0).copy()
    scale = max(out.shape[0], out.shape[1]) / 640 * line_width / 2
    for row, (name, p) in enumerate(top):
        y = int((row + 1) * 24 * scale) + 4
        cv2.putText(out, f"{name} {p:.2f}", (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, class_color(row), max(line_width - 1, 1),
                    cv2.LINE_AA)
    return out


def _save(top: list[tuple[str, float]], im0: np.ndarray, p: Path, dataset: Any, save_dir: Path, opts: dict, sink: VideoSink) -> None:
    """--save-txt lines 'probability name' (YOLOv5's), the annotated image or video frame."""
    is_image = p.suffix[1:].lower() not in VID_FORMATS and getattr(dataset, "mode", "image") == "image"
    stem = safe_component(p.stem if is_image else f"{p.stem}_{getattr(dataset, 'frame', 0)}")
    if opts["save_txt"]:
        with (save_dir / "labels" / f"{stem}.txt").open("a") as f:
            f.writelines(f"{prob:.2f} {name}\n" for name, prob in top)
    if opts["nosave"] and not opts["view_img"]:
        return
    show_and_save(draw_top(im0, top, opts["line_thickness"]), p, is_image, dataset, save_dir, opts, sink)


@torch.no_grad()
def run(
    weights: Any = ROOT / "runs/train-cls/exp/weights/best.pt",
    source: Any = None,
    imgsz: Any = (96, 96),
    device: str = "",
    view_img: bool = False,
    save_txt: bool = False,
    nosave: bool = False,
    project: Any = ROOT / "runs/predict-cls",
    name: str = "exp",
    exist_ok: bool = False,
    line_thickness: int = 2,
    half: bool = False,
    vid_stride: int = 1,
    **_detection_options: Any,
) -> Path:
    """Classify every image or frame of `source`, save annotated copies (and --save-txt top-5 lists) under
    runs/predict-cls/exp*; returns the run folder. Detection flags that predict_parser shares do not apply."""
    from utils.runtime.backend import DetectBackend

    size = int(imgsz if isinstance(imgsz, int) else imgsz[0])
    check_img_size(size)
    check_int("--vid-stride", vid_stride)
    dev = select_device(device)
    half = half and dev.type == "cuda"
    view_img = view_img and check_imshow()
    model = DetectBackend(weights[0] if isinstance(weights, (list, tuple)) else weights, device=dev, fp16=half)
    check_script_task(get_task(ClassifyTask.name), model, "predict", model.weights)
    size = check_img_size(size, int(model.stride)) if model.dynamic else int((model.input_shape or (1, 3, size))[2])
    names = list(model.names)
    source = str(source) if source is not None else default_source()
    dataset = open_source(source, (size, size), 32, False, vid_stride)  # before the run folder
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    sink, seen, times = VideoSink(), 0, np.zeros(3)
    opts = dict(save_txt=save_txt, nosave=nosave, view_img=view_img, line_thickness=line_thickness)
    failures: list[str] = []
    for path, _, im0s, desc in dataset:
        if isinstance(path, str) and Path(path).suffix[1:].lower() in VID_FORMATS and (dataset.frame - 1) % max(vid_stride, 1):
            continue
        for i, im0 in enumerate(im0s if isinstance(im0s, list) else [im0s]):
            item = path[i] if isinstance(path, list) else path
            with skip_failed_image(item_name(item, dataset), failures):  # one bad image or frame never ends the run
                t0 = time.perf_counter()
                x = classify_input(im0, size, dev, half)
                t1 = time.perf_counter()
                probs = model(x)
                probs = (probs[0] if isinstance(probs, (tuple, list)) else probs)[0]
                t2 = time.perf_counter()
                top = top_classes(probs, names)
                _save(top, im0, Path(item), dataset, save_dir, opts, sink)
                times += (t1 - t0, t2 - t1, time.perf_counter() - t2)
                seen += 1
                LOGGER.info(f"{desc}{size}x{size} {', '.join(f'{n} {p:.2f}' for n, p in top)}, {(t2 - t1) * 1e3:.1f}ms")
    sink.close()
    check_some_succeeded(source, failures, seen)
    pre, inf, post = tuple(times / max(seen, 1) * 1e3)
    LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {post:.1f}ms post-process per image at shape "
                f"(1, 3, {size}, {size})")
    LOGGER.info(f"Results saved to {save_dir}" + (f", labels in {save_dir / 'labels'}" if save_txt else ""))
    return save_dir
