"""The prediction path every front end shares (detect.py, segment/predict.py, the model object): open a source, run the
model, suppress overlaps, scale to the original image; one Prediction per image or video frame, lazily.

What happens to a Prediction afterwards (drawn and saved by detect.py, wrapped in Results by the model object, given
track ids by a tracker) is the caller's business, so every front end sees the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.heads.segment import crop_to_boxes, masks_from_protos
from utils.boxes import scale_boxes
from utils.data.images import VID_FORMATS, skip_failed_image
from utils.nms import non_max_suppression
from utils.segmentation import MASK_THRESHOLD, scale_masks


@dataclass(frozen=True)
class PredictStep:
    """How each batch is run: device and precision, test-time augmentation, NMS settings, mask resolution."""

    device: torch.device
    half: bool = False
    augment: bool = False
    retina_masks: bool = False
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    classes: list[int] | None = None
    agnostic: bool = False
    max_det: int = 1000
    vid_stride: int = 1


@dataclass
class Prediction:
    """One image's or video frame's detections as detect.py saves them: (n, 6) float32 CPU rows x1 y1 x2 y2 conf cls in
    original-image pixels (rounded, as YOLOv5), (n, h0, w0) bool masks for a segmentation model, track ids once tracked."""

    path: Path
    frame: int  # 1-based frame number of a video or stream; 0 for an image
    is_image: bool
    orig_img: np.ndarray  # BGR, as read
    det: torch.Tensor
    masks: torch.Tensor | None
    input_hw: tuple[int, int]  # the letterboxed size the model saw
    seconds: tuple[float, float, float]  # pre-process, inference, NMS, per image of the batch it came in
    desc: str  # detect.py's log prefix: 'image 1/2 path: '
    ids: torch.Tensor | None = field(default=None)  # (n,) int64 track ids

    @property
    def name(self) -> str:
        """What a warning calls this item: the image file or 'video.mp4 frame 7'."""
        return str(self.path) if self.is_image else f"{self.path} frame {self.frame}"

    def select(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> Prediction:
        """A copy keeping the detections (and masks) at `rows`, with `ids` as their track ids."""
        masks = None if self.masks is None else self.masks[rows]
        return replace(self, det=self.det[rows], masks=masks, ids=ids)


def open_source(source: Any, imgsz: tuple[int, int], stride: int, auto: bool, vid_stride: int) -> Any:
    """Images/videos/lists and image URLs (downloaded, then read as files) via LoadImages; a webcam index or another
    stream URL via LoadStreams."""
    from utils.data.sources import LoadImages, is_image_url

    text = str(source)
    is_stream = text.isnumeric() or text.lower().startswith(("rtsp://", "rtmp://", "http://", "https://"))
    if not isinstance(source, list) and is_stream and not is_image_url(text) and not Path(text).exists():
        from utils.data.streams import LoadStreams

        return LoadStreams(text, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)
    return LoadImages(source if isinstance(source, list) else text, img_size=imgsz, stride=stride, auto=auto)


def prepare_batch(im: np.ndarray, device: torch.device, half: bool) -> torch.Tensor:
    """uint8 CHW (or BCHW) numpy -> float 0-1 BCHW tensor on the device."""
    t = torch.from_numpy(np.ascontiguousarray(im)).to(device)
    t = (t.half() if half else t.float()) / 255
    return t[None] if t.ndim == 3 else t


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


def is_image_item(path: Any, dataset: Any) -> bool:
    """Whether a source item is a still image (not a video frame or a stream frame)."""
    p = str(path[0] if isinstance(path, list) else path)
    return Path(p).suffix[1:].lower() not in VID_FORMATS and getattr(dataset, "mode", "image") == "image"


def item_name(path: Any, dataset: Any) -> str:
    """What a warning calls one item of a source: the image file, 'video.mp4 frame 7' or the stream's name."""
    p = str(path[0] if isinstance(path, list) else path)
    return p if is_image_item(path, dataset) else f"{p} frame {getattr(dataset, 'frame', 0)}"


def _infer(model: Any, im: np.ndarray, im0s: Any, path: Any, desc: str, dataset: Any, step: PredictStep) -> list[Prediction]:
    """Run one item of the source (an image, a video frame or a stream batch) -> one Prediction per image in it."""
    t0 = time.perf_counter()
    x = prepare_batch(im, step.device, step.half)
    t1 = time.perf_counter()
    out = model(x, augment=True) if step.augment else model(x)
    pred, protos = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)  # segmentation: (detections, prototypes)
    t2 = time.perf_counter()
    nm = 0 if protos is None else protos.shape[1]
    dets = non_max_suppression(pred, conf_thres=step.conf_thres, iou_thres=step.iou_thres, classes=step.classes,
                               agnostic=step.agnostic, max_det=step.max_det, head=model.head_kind, nm=nm)
    frames = im0s if isinstance(im0s, list) else [im0s]
    hw = (int(x.shape[2]), int(x.shape[3]))
    out_items = []
    for i, det in enumerate(dets):
        im0 = frames[i]
        masks = None if protos is None else instance_masks(det, protos[i], hw, im0.shape[:2], step.retina_masks)
        det[:, :4] = scale_boxes(hw, det[:, :4], im0.shape[:2]).round()
        image = is_image_item(path, dataset)
        frame = 0 if image else int(getattr(dataset, "frame", 0))
        out_items.append(Prediction(Path(path[i] if isinstance(path, list) else path), frame, image, im0,
                                    det[:, :6].float().cpu(), masks, hw, (0.0, 0.0, 0.0), desc))
    n = max(len(dets), 1)
    seconds = ((t1 - t0) / n, (t2 - t1) / n, (time.perf_counter() - t2) / n)
    return [replace(p, seconds=seconds) for p in out_items]


def predictions(model: Any, dataset: Any, step: PredictStep, failures: list[str]) -> Iterator[Prediction]:
    """Predictions for each image or kept video frame of `dataset`, one item at a time (memory stays flat over a long
    video). An item that fails is skipped with one warning, its 'name: problem' appended to `failures`."""
    for path, im, im0s, desc in dataset:
        if isinstance(path, str) and Path(path).suffix[1:].lower() in VID_FORMATS and (dataset.frame - 1) % max(step.vid_stride, 1):
            continue
        items: list[Prediction] = []
        with skip_failed_image(item_name(path, dataset), failures):  # one bad image or frame never ends the run
            items = _infer(model, im, im0s, path, desc, dataset, step)
        yield from items


class ArraySource:
    """In-memory images (numpy arrays, PIL images, or a list mixing them with paths and URLs) as a detect.py source:
    each read once by utils.inference.inputs, then letterboxed one at a time."""

    mode = "image"
    fps = None
    frame = 0

    def __init__(self, images: Any, img_size: tuple[int, int], stride: int, auto: bool, channel_order: str = "bgr") -> None:
        from utils.inference.inputs import load_inputs

        self.images = load_inputs(images, channel_order=channel_order)
        self.img_size, self.stride, self.auto = img_size, stride, auto

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
        from utils.data.images import img_to_tensor_layout, letterbox

        for i, item in enumerate(self.images):
            im = img_to_tensor_layout(letterbox(item.image, self.img_size, stride=self.stride, auto=self.auto)[0])
            yield item.name, im, item.image, f"image {i + 1}/{len(self.images)} {item.name}: "


def open_any_source(source: Any, imgsz: tuple[int, int], stride: int, auto: bool, vid_stride: int) -> Any:
    """What the model object reads: paths, folders, globs, videos, URLs, webcam indices and streams as detect.py does
    (lazily, so a long video is never held in memory); numpy arrays (BGR, as ultralytics) and PIL images in memory."""
    items = source if isinstance(source, (list, tuple)) else [source]
    if isinstance(source, int):
        source = str(source)
    if all(isinstance(s, (str, Path)) for s in items):
        return open_source([str(s) for s in items] if isinstance(source, (list, tuple)) else str(source), imgsz, stride,
                           auto, vid_stride)
    return ArraySource(source, imgsz, stride, auto)
