"""What detect.py and segment/predict.py run: open a source, run the model, suppress overlaps, then draw and save.

A model with a Segment head also gets its instance masks: drawn translucent, and saved as polygons with --save-txt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.cli import check_fraction, check_img_size, check_int
from utils.data.dataset_config import load_dataset_config
from utils.data.images import check_some_succeeded, skip_failed_image
from utils.device import select_device
from utils.files import safe_component
from utils.inference.predictor import Prediction, PredictStep, open_source, predictions
from utils.inference.tracking import PredictionTracker
from utils.nms import batched_nms_kernel
from utils.paths import ROOT, increment_path
from utils.plots import draw_detections, draw_masks
from utils.predictions import describe, save_crops, write_csv_rows, write_labels, write_polygon_labels
from utils.runtime.backend import DetectBackend
from utils.tasks import check_script_task, get_task

LOGGER = logging.getLogger("mobile_yolo")
DEFAULT_FPS = 30.0  # the rate a video is written at when its source declares none (YOLOv5's)


def default_source() -> str:
    """data/images (the shipped sample images), as in YOLOv5; without it, the embedded dataset's validation images."""
    samples = ROOT / "data" / "images"
    if samples.is_dir() and any(samples.iterdir()):
        return str(samples)
    data = load_dataset_config(None)
    val = data["val"]
    return str(val[0] if isinstance(val, list) else val)


def no_display_reason() -> str:
    """Why no window can open here ('' when one may): on Linux no DISPLAY / WAYLAND_DISPLAY, where a GUI build of OpenCV
    would abort the process in imshow rather than raise."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    return ""


def check_imshow(warn: bool = True) -> bool:
    """Whether OpenCV can show a window here (tried once, as YOLOv5 does); when not, one warning line saying why.

    Headless OpenCV raises cv2.error in imshow; a GUI build without a display would abort the process, so on Linux
    no DISPLAY / WAYLAND_DISPLAY counts as no display before imshow is tried."""
    reason = no_display_reason()
    if not reason:
        try:
            cv2.imshow("check_imshow", np.zeros((8, 8, 3), np.uint8))
            cv2.waitKey(1)
            cv2.destroyAllWindows()
            cv2.waitKey(1)
        except cv2.error:
            reason = "this OpenCV build cannot open windows (headless)"
    if reason and warn:
        LOGGER.warning(f"WARNING: --view-img turned off: {reason}; results are still saved")
    return not reason


class VideoSink:
    """Writes annotated frames to one mp4 per input video or stream, at the source's frame rate (DEFAULT_FPS when it has
    none: image sequences, streams that declare none)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.writer: Any = None

    def write(self, path: Path, frame: np.ndarray, fps: float | None) -> None:
        """Append one frame to path.mp4, opening that file at `fps` on its first frame."""
        if path != self.path:
            self.close()
            self.path = path
            h, w = frame.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]  # missing from OpenCV's type stubs
            self.writer = cv2.VideoWriter(str(path.with_suffix(".mp4")), fourcc, fps or DEFAULT_FPS, (w, h))
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.writer, self.path = None, None


def save_prediction(pred: Prediction, dataset: Any, save_dir: Path, names: list[str], opts: dict, sink: VideoSink) -> None:
    """Save labels, crops and the annotated image or video frame of one prediction (masks and track ids drawn too)."""
    det, im0, p, masks = pred.det, pred.orig_img, pred.path, pred.masks
    stem = safe_component(p.stem if pred.is_image else f"{p.stem}_{pred.frame}")
    if opts["save_txt"]:
        label_file = save_dir / "labels" / f"{stem}.txt"
        if masks is None:
            write_labels(det, im0.shape[:2], label_file, opts["save_conf"], opts["save_format"])
        else:  # YOLOv5's segment/predict.py: one normalised polygon per instance
            write_polygon_labels(det, masks.numpy(), label_file, opts["save_conf"])
    if opts["save_csv"]:
        write_csv_rows(det, p.name if pred.is_image else f"{p.name}:{pred.frame}", names, save_dir / "predictions.csv")
    if opts["save_crop"]:
        save_crops(det, im0, names, save_dir / "crops", stem)
    style = {k: opts[k] for k in ("line_width", "hide_labels", "hide_conf")}
    if masks is not None:
        im0 = draw_masks(im0, masks.numpy(), det[:, 5].long().tolist())
    ids = None if pred.ids is None else pred.ids.tolist()
    show_and_save(draw_detections(im0, det, names, ids=ids, **style), p, pred.is_image, dataset, save_dir, opts, sink)


def show_and_save(annotated: np.ndarray, p: Path, is_image: bool, dataset: Any, save_dir: Path, opts: dict, sink: VideoSink) -> None:
    """Unless --nosave the annotated image or frame is written (images) or appended to the video (at the source's frame
    rate); then --view-img shows it (saved first: a window that fails never loses the result)."""
    if not opts["nosave"]:
        if is_image:
            cv2.imwrite(str(save_dir / p.name), annotated)
        else:
            sink.write(save_dir / p.stem, annotated, getattr(dataset, "fps", None))
    if opts["view_img"]:
        cv2.imshow(str(p), annotated)
        cv2.waitKey(1)


@torch.no_grad()
def run(
    weights: Any = ROOT / "runs/train/exp/weights/best.pt",
    source: Any = None,
    data: Any = None,
    imgsz: Any = (640, 640),
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 1000,
    device: str = "",
    view_img: bool = False,
    save_txt: bool = False,
    save_format: int = 0,
    save_csv: bool = False,
    save_conf: bool = False,
    save_crop: bool = False,
    nosave: bool = False,
    classes: list[int] | None = None,
    agnostic_nms: bool = False,
    augment: bool = False,
    project: Any = ROOT / "runs/detect",
    name: str = "exp",
    exist_ok: bool = False,
    line_thickness: int = 3,
    hide_labels: bool = False,
    hide_conf: bool = False,
    half: bool = False,
    vid_stride: int = 1,
    retina_masks: bool = False,
    track: bool = False,
    tracker: str = "bytetrack",
    script_task: str = "detect",
) -> Path:
    """Detect objects (and their masks, for a segmentation model) in `source`, save annotated media and labels under
    runs/detect/exp*; returns the run folder. retina_masks: masks resized to the original image before cropping;
    track: follow objects across frames (ids drawn, MOTChallenge rows in tracks/); script_task: the task whose script
    runs this (segment/predict.py: 'segment'), refusing weights it cannot run."""
    check_options(imgsz, conf_thres, iou_thres, max_det, vid_stride, line_thickness, save_format)
    follower = PredictionTracker(tracker) if track else None
    model, step, size = load_predictor(weights, device, half, imgsz, script_task, augment=augment, retina_masks=retina_masks,
                                       conf_thres=conf_thres, iou_thres=iou_thres, classes=classes, agnostic=agnostic_nms,
                                       max_det=max_det, vid_stride=vid_stride)
    view_img = view_img and check_imshow()
    names = list(model.names)
    source = str(source) if source is not None else default_source()
    dataset = open_source(source, size, int(model.stride), bool(getattr(model, "pt", False)), vid_stride)  # before the run folder
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    opts = dict(save_txt=save_txt, save_format=save_format, save_csv=save_csv, save_conf=save_conf, save_crop=save_crop,
                view_img=view_img, nosave=nosave, line_width=line_thickness, hide_labels=hide_labels, hide_conf=hide_conf)
    sink, seen, times, failures = VideoSink(), 0, np.zeros(3), list[str]()
    for pred in predictions(model, dataset, step, failures):
        with skip_failed_image(pred.name, failures):  # drawing or saving one image never ends the run
            if follower is not None:
                pred = follower(pred, getattr(dataset, "fps", None))
                follower.save_mot(save_dir, pred)
            save_prediction(pred, dataset, save_dir, names, opts, sink)
            times, seen = times + pred.seconds, seen + 1
            LOGGER.info(f"{pred.desc}{pred.input_hw[0]}x{pred.input_hw[1]} {describe(pred.det, names)}, {pred.seconds[1] * 1e3:.1f}ms")
    sink.close()
    check_some_succeeded(source, failures, seen)
    _report(save_dir, times / max(seen, 1) * 1e3, size, save_txt, save_csv, nosave, follower, names)
    return save_dir


def load_predictor(weights: Any, device: Any, half: bool, imgsz: Any, script_task: str, **settings: Any
                   ) -> tuple[DetectBackend, PredictStep, tuple[int, int]]:
    """The model (any runnable format), how to run it, and the inference size made a multiple of its stride."""
    dev = select_device(device)
    if half and dev.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; running in float32")
        half = False
    model = weights if isinstance(weights, DetectBackend) else DetectBackend(
        weights[0] if isinstance(weights, (list, tuple)) else weights, device=dev, fp16=half)
    check_script_task(get_task(script_task), model, "predict", model.weights)  # detect.py draws a segmentation model's masks too
    size = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz) * (2 if len(imgsz) == 1 else 1)
    size = tuple(check_img_size(list(size), int(model.stride)))
    batched_nms_kernel()  # imported before the timed loop, so the Speed line's NMS time is the kernel's, not an import
    return model, PredictStep(device=dev, half=half, **settings), (int(size[0]), int(size[1]))


def _report(save_dir: Path, per_image: np.ndarray, size: tuple[int, int], save_txt: bool, save_csv: bool, nosave: bool,
            follower: PredictionTracker | None, names: list[str]) -> None:
    """detect.py's closing lines: speed per image, tracks per class, where the results went."""
    pre, inf, nms = per_image
    LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at shape (1, 3, {size[0]}, {size[1]})")
    for where, counts in follower.counts() if follower is not None else []:
        shown = ", ".join(f"{n} {names[c] if c < len(names) else c}" for c, n in sorted(counts.items())) or "none"
        LOGGER.info(f"Tracks in {where}: {shown} (MOT rows in {save_dir / 'tracks'})")
    if save_csv:
        LOGGER.info(f"CSV saved to {save_dir / 'predictions.csv'}")
    if save_txt or not nosave:
        n_labels = len(list((save_dir / "labels").glob("*.txt"))) if save_txt else 0
        LOGGER.info(f"Results saved to {save_dir}" + (f", {n_labels} labels in {save_dir / 'labels'}" if save_txt else ""))


def check_options(
    imgsz: Any, conf_thres: float, iou_thres: float, max_det: int, vid_stride: int, line_thickness: int, save_format: int = 0
) -> None:
    """Reject values that cannot detect (one line naming the flag) before any folder is created."""
    if save_format not in (0, 1):
        raise ValueError(f"--save-format {save_format!r}: 0 (YOLO cx cy w h) or 1 (Pascal-VOC x1 y1 x2 y2)")
    check_img_size(imgsz)
    check_fraction("--conf-thres", conf_thres)
    check_fraction("--iou-thres", iou_thres)
    check_int("--max-det", max_det)
    check_int("--vid-stride", vid_stride)
    check_int("--line-thickness", line_thickness, minimum=0)


def predict_parser(task: str = "detect") -> argparse.ArgumentParser:
    """YOLOv5's detect.py flags with the task's defaults and its own flags (segment/predict.py's --retina-masks)."""
    t = get_task(task)
    p = argparse.ArgumentParser(description=f"Predict with a trained or exported {t.what}")
    default_weights = ROOT / t.train_project / "exp/weights/best.pt"
    p.add_argument("--weights", nargs="+", default=[str(default_weights)], help="model path(s)")
    p.add_argument("--source", default=None, help="file/dir/glob/video/list.txt/webcam index/URL (default: data/images)")
    p.add_argument("--data", default=None, help="dataset yaml (class names fallback)")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w")
    p.add_argument("--conf-thres", type=float, default=0.25)
    p.add_argument("--iou-thres", type=float, default=0.45)
    p.add_argument("--max-det", type=int, default=1000)
    p.add_argument("--device", default="")
    p.add_argument("--view-img", action="store_true")
    p.add_argument("--save-txt", action="store_true")
    p.add_argument("--save-format", type=int, default=0, choices=(0, 1),
                   help="--save-txt boxes: 0 YOLO (cx cy w h), 1 Pascal-VOC (x1 y1 x2 y2)")
    p.add_argument("--save-csv", action="store_true", help="save results to predictions.csv")
    p.add_argument("--save-conf", action="store_true")
    p.add_argument("--save-crop", action="store_true")
    p.add_argument("--nosave", action="store_true", help="do not save images/videos")
    p.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    p.add_argument("--agnostic-nms", action="store_true")
    p.add_argument("--augment", action="store_true")
    p.add_argument("--project", default=str(ROOT / t.predict_project))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--line-thickness", default=3, type=int)
    p.add_argument("--hide-labels", action="store_true")
    p.add_argument("--hide-conf", action="store_true")
    p.add_argument("--half", action="store_true")
    p.add_argument("--vid-stride", type=int, default=1)
    p.add_argument("--track", action="store_true", help="follow objects across video frames: ids drawn, MOT rows in tracks/")
    p.add_argument("--tracker", default="bytetrack", help="with --track: the tracker (bytetrack)")
    t.add_predict_args(p)
    p.set_defaults(script_task=t.name)  # the weights are checked against the script's task
    return p


def parse_predict_args(task: str = "detect", argv: list[str] | None = None) -> argparse.Namespace:
    """Parse detect.py's (or segment/predict.py's) command line; one --imgsz value means a square size."""
    opt = predict_parser(task).parse_args(argv)
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz[:2]
    return opt
