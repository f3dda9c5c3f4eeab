"""What detect.py and segment/predict.py run: open a source, run the model, suppress overlaps, then draw and save.

A model with a Segment head also gets its instance masks: drawn translucent, and saved as polygons with --save-txt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.heads.segment import crop_to_boxes, masks_from_protos
from utils.boxes import scale_boxes
from utils.cli import check_fraction, check_img_size, check_int
from utils.data.dataset_config import load_dataset_config
from utils.data.images import VID_FORMATS, check_some_succeeded, skip_failed_image
from utils.device import select_device
from utils.files import safe_component
from utils.nms import batched_nms_kernel, non_max_suppression
from utils.paths import ROOT, increment_path
from utils.plots import draw_detections, draw_masks
from utils.predictions import describe, save_crops, write_csv_rows, write_labels, write_polygon_labels
from utils.segmentation import MASK_THRESHOLD, scale_masks
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


def open_source(source: str, imgsz: tuple[int, int], stride: int, auto: bool, vid_stride: int) -> Any:
    """Images/videos/lists and image URLs (downloaded, then read as files) via LoadImages; a webcam index or another
    stream URL via LoadStreams."""
    from utils.data.sources import LoadImages, is_image_url

    is_stream = source.isnumeric() or source.lower().startswith(("rtsp://", "rtmp://", "http://", "https://"))
    if is_stream and not is_image_url(source) and not Path(source).exists():
        from utils.data.streams import LoadStreams

        return LoadStreams(source, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)
    return LoadImages(source, img_size=imgsz, stride=stride, auto=auto)


def check_imshow(warn: bool = True) -> bool:
    """Whether OpenCV can show a window here (tried once, as YOLOv5 does); when not, one warning line saying why.

    Headless OpenCV raises cv2.error in imshow; a GUI build without a display would abort the process, so on Linux
    no DISPLAY / WAYLAND_DISPLAY counts as no display before imshow is tried."""
    reason = ""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        reason = "no display (DISPLAY is not set)"
    else:
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


def _emit(
    det: torch.Tensor, im0: np.ndarray, p: Path, dataset: Any, save_dir: Path, names: list[str], opts: dict, sink: VideoSink,
    masks: torch.Tensor | None = None,
) -> None:
    """Save labels, crops and the annotated image or video frame for one image's detections (and (n, h0, w0) masks)."""
    is_image = p.suffix[1:].lower() not in VID_FORMATS and getattr(dataset, "mode", "image") == "image"
    stem = safe_component(p.stem if is_image else f"{p.stem}_{getattr(dataset, 'frame', 0)}")
    if opts["save_txt"]:
        label_file = save_dir / "labels" / f"{stem}.txt"
        if masks is None:
            write_labels(det, im0.shape[:2], label_file, opts["save_conf"], opts["save_format"])
        else:  # YOLOv5's segment/predict.py: one normalised polygon per instance
            write_polygon_labels(det, masks.numpy(), label_file, opts["save_conf"])
    if opts["save_csv"]:
        write_csv_rows(det, p.name if is_image else f"{p.name}:{getattr(dataset, 'frame', 0)}", names, save_dir / "predictions.csv")
    if opts["save_crop"]:
        save_crops(det, im0, names, save_dir / "crops", stem)
    style = {k: opts[k] for k in ("line_width", "hide_labels", "hide_conf")}
    if masks is not None:
        im0 = draw_masks(im0, masks.numpy(), det[:, 5].long().tolist())
    show_and_save(draw_detections(im0, det[:, :6], names, **style), p, is_image, dataset, save_dir, opts, sink)


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


def instance_masks(det: torch.Tensor, protos: torch.Tensor, img_hw: tuple[int, int], shape0: tuple[int, int],
                   retina: bool = False) -> torch.Tensor:
    """(n, h0, w0) bool CPU masks on the original image for (n, 6 + nm) detections in input pixels.

    By default each mask is cropped to its box at the input resolution, then resized; `retina` resizes first and crops
    with the box in original pixels, for sharper edges (YOLOv5's --retina-masks)."""
    boxes = det[:, :4].float()
    if not retina:
        masks = masks_from_protos(protos.float(), det[:, 6:].float(), boxes, img_hw, upsample=True)
        return scale_masks(masks, img_hw, shape0).gt(MASK_THRESHOLD).cpu()
    masks = scale_masks(masks_from_protos(protos.float(), det[:, 6:].float(), boxes, img_hw), img_hw, shape0)
    return crop_to_boxes(masks, scale_boxes(img_hw, boxes.clone(), shape0)).gt(MASK_THRESHOLD).cpu()


def _prepare(im: np.ndarray, device: torch.device, half: bool) -> torch.Tensor:
    """uint8 CHW (or BCHW) numpy -> float 0-1 BCHW tensor on the device."""
    t = torch.from_numpy(np.ascontiguousarray(im)).to(device)
    t = (t.half() if half else t.float()) / 255
    return t[None] if t.ndim == 3 else t


def item_name(path: Any, dataset: Any) -> str:
    """What a warning calls one item of a source: the image file, 'video.mp4 frame 7' or the stream's name."""
    p = str(path[0] if isinstance(path, list) else path)
    is_image = Path(p).suffix[1:].lower() not in VID_FORMATS and getattr(dataset, "mode", "image") == "image"
    return p if is_image else f"{p} frame {getattr(dataset, 'frame', 0)}"


def _predict_item(model: Any, im: np.ndarray, im0s: Any, path: Any, desc: str, dataset: Any, step: dict,
                  sink: VideoSink) -> tuple[np.ndarray, int]:
    """Detect, save and log one item of the source (an image, a video frame or a stream batch); returns the
    (pre-process, inference, NMS) seconds and the number of images done."""
    t0 = time.perf_counter()
    x = _prepare(im, step["device"], step["half"])
    t1 = time.perf_counter()
    out = model(x, augment=True) if step["augment"] else model(x)
    pred, protos = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)  # segmentation: (detections, prototypes)
    t2 = time.perf_counter()
    nm = 0 if protos is None else protos.shape[1]
    dets = non_max_suppression(pred, **step["nms"], head=model.head_kind, nm=nm)
    took = np.array((t1 - t0, t2 - t1, time.perf_counter() - t2))
    frames = im0s if isinstance(im0s, list) else [im0s]
    hw = (int(x.shape[2]), int(x.shape[3]))
    for i, det in enumerate(dets):
        p = Path(path[i] if isinstance(path, list) else path)
        masks = None if protos is None else instance_masks(det, protos[i], hw, frames[i].shape[:2], step["retina_masks"])
        det[:, :4] = scale_boxes(hw, det[:, :4], frames[i].shape[:2]).round()
        _emit(det.float().cpu(), frames[i].copy(), p, dataset, step["save_dir"], step["names"], step["opts"], sink, masks)
        LOGGER.info(f"{desc}{x.shape[2]}x{x.shape[3]} {describe(det, step['names'])}, {(t2 - t1) * 1e3:.1f}ms")
    return took, len(dets)


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
    script_task: str = "detect",
) -> Path:
    """Detect objects (and their masks, for a segmentation model) in `source`, save annotated media and labels under
    runs/detect/exp*; returns the run folder. retina_masks: masks resized to the original image before cropping;
    script_task: the task whose script runs this (segment/predict.py: 'segment'), refusing weights it cannot run."""
    from utils.runtime.backend import DetectBackend

    check_options(imgsz, conf_thres, iou_thres, max_det, vid_stride, line_thickness, save_format)
    dev = select_device(device)
    if half and dev.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; running in float32")
        half = False
    view_img = view_img and check_imshow()
    model = DetectBackend(weights[0] if isinstance(weights, (list, tuple)) else weights, device=dev, fp16=half)
    check_script_task(get_task(script_task), model, "predict", model.weights)  # detect.py draws a segmentation model's masks too
    stride, names = int(model.stride), list(model.names)
    size = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz) * (2 if len(imgsz) == 1 else 1)
    size = tuple(check_img_size(list(size), stride))
    source = str(source) if source is not None else default_source()
    dataset = open_source(source, size, stride, bool(getattr(model, "pt", False)), vid_stride)  # before the run folder
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    batched_nms_kernel()  # imported before the timed loop, so the Speed line's NMS time is the kernel's, not an import
    sink, seen, times = VideoSink(), 0, np.zeros(3)
    opts = dict(save_txt=save_txt, save_format=save_format, save_csv=save_csv, save_conf=save_conf, save_crop=save_crop,
                view_img=view_img, nosave=nosave, line_width=line_thickness, hide_labels=hide_labels, hide_conf=hide_conf)
    step = dict(device=dev, half=half, augment=augment, retina_masks=retina_masks, save_dir=save_dir, names=names, opts=opts,
                nms=dict(conf_thres=conf_thres, iou_thres=iou_thres, classes=classes, agnostic=agnostic_nms, max_det=max_det))
    failures: list[str] = []
    for path, im, im0s, desc in dataset:
        if isinstance(path, str) and Path(path).suffix[1:].lower() in VID_FORMATS and (dataset.frame - 1) % max(vid_stride, 1):
            continue
        with skip_failed_image(item_name(path, dataset), failures):  # one bad image or frame never ends the run
            took, n = _predict_item(model, im, im0s, path, desc, dataset, step, sink)
            times, seen = times + took, seen + n
    sink.close()
    check_some_succeeded(source, failures, seen)
    per_image = tuple(times / max(seen, 1) * 1e3)
    pre, inf, nms = per_image
    LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at shape (1, 3, {size[0]}, {size[1]})")
    if save_csv:
        LOGGER.info(f"CSV saved to {save_dir / 'predictions.csv'}")
    if save_txt or not nosave:
        n_labels = len(list((save_dir / "labels").glob("*.txt"))) if save_txt else 0
        LOGGER.info(f"Results saved to {save_dir}" + (f", {n_labels} labels in {save_dir / 'labels'}" if save_txt else ""))
    return save_dir


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
    t.add_predict_args(p)
    p.set_defaults(script_task=t.name)  # the weights are checked against the script's task
    return p


def parse_predict_args(task: str = "detect", argv: list[str] | None = None) -> argparse.Namespace:
    """Parse detect.py's (or segment/predict.py's) command line; one --imgsz value means a square size."""
    opt = predict_parser(task).parse_args(argv)
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz[:2]
    return opt
