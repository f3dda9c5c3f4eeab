"""AutoShape: call a detector on anything image-like and get Detections back (YOLOv5's torch.hub model interface)."""

from __future__ import annotations

import time
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from utils.boxes import scale_boxes
from utils.cli import check_fraction, check_img_size, check_int
from utils.data.images import img_to_tensor_layout, letterbox, settle_failures, skip_failed_image
from utils.inference.inputs import NamedImage, load_inputs
from utils.inference.results import Detections
from utils.nms import non_max_suppression
from utils.runtime.backend import DetectBackend
from utils.tasks import task_of
from utils.tasks.detect import DetectTask


def batch_shape(shapes: list[tuple[int, int]], size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Smallest stride-multiple (h, w) holding every image scaled to fit `size` (YOLOv5's shared batch shape); at least
    one stride each way, as a 1-pixel-tall image scaled to fit still needs a row."""
    scaled = [(h * min(size[0] / h, size[1] / w), w * min(size[0] / h, size[1] / w)) for h, w in shapes]
    h, w = max(s[0] for s in scaled), max(s[1] for s in scaled)
    return max(stride, int(np.ceil(round(h) / stride) * stride)), max(stride, int(np.ceil(round(w) / stride) * stride))


class AutoShape(nn.Module):
    """Wraps a DetectBackend: images of any kind in, letterboxed batch, inference, NMS, boxes back in each image's pixels.

    A torch.Tensor batch (B, 3, H, W) or one (3, H, W) image, floats 0-1 or uint8 0-255 (scaled to 0-1), H and W
    multiples of the stride, is passed straight to the model and its raw output returned, so the wrapper can be traced;
    any other tensor is one ValueError line. Images that fail to read or letterbox are skipped with one warning each
    (ImageError when none is left). Filtering is set by attributes, as in YOLOv5: conf, iou, classes, agnostic,
    multi_label, max_det; `amp` runs CUDA inference under autocast; `channel_order` says what numpy arrays hold ("bgr" as OpenCV
    reads them, or "rgb").
    """

    @staticmethod
    def serves(model: Any) -> bool:
        """Whether the model's predictions are boxes alone (the detection task's, not a subclass's with more)."""
        return type(task_of(model)) is DetectTask

    def __init__(self, model: DetectBackend) -> None:
        super().__init__()
        if not self.serves(model):  # Detections holds boxes alone: masks or class scores would be lost
            own = task_of(model)
            raise ValueError(f"{model.weights}: AutoShape returns boxes only; run {own.what}s with {own.predict_script} "
                             "or load them with autoshape=False")
        self.model = model.eval()
        self.conf = 0.25  # NMS confidence threshold
        self.iou = 0.45  # NMS IoU threshold
        self.classes: list[int] | None = None  # keep only these class indices
        self.agnostic = False  # NMS across classes
        self.multi_label = False  # one box per class above conf
        self.max_det = 1000  # boxes per image
        self.amp = False  # autocast on CUDA
        self.channel_order = "bgr"

    @property
    def names(self) -> list[str]:
        """Class names of the wrapped model."""
        return self.model.names

    @property
    def stride(self) -> int:
        """Largest stride of the wrapped model."""
        return self.model.stride

    @property
    def pt(self) -> bool:
        """True when a PyTorch model (not an exported file) runs underneath."""
        return self.model.pt

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else self.model.device

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(device_type=device.type, enabled=bool(self.amp) and device.type == "cuda")

    def forward(self, ims: Any, size: Union[int, tuple[int, int], list[int]] = 640, augment: bool = False,
                profile: bool = False) -> Any:
        """Detections for a path, folder, glob, URL, array, PIL image or list of them; the raw output for a tensor batch
        ((B, 3, H, W) or (3, H, W); float 0-1, or uint8 0-255, which is scaled to 0-1)."""
        device = self._device()
        if isinstance(ims, torch.Tensor):
            x = self._tensor_batch(ims)
            with self._autocast(device):
                return self.model(x.to(device), augment=augment)
        self._check_options()
        hw = self._check_size(size)
        with torch.inference_mode():
            return self._detect(ims, hw, augment, device, profile)

    def _channels(self) -> int:
        """Input channels the model takes: a static export's, else the first convolution's, else 3."""
        if self.model.input_shape is not None:
            return int(self.model.input_shape[1])
        if self.model.pt:
            conv = next((m for m in self.model.model.modules() if isinstance(m, nn.Conv2d)), None)
            return int(conv.in_channels) if conv is not None else 3
        return 3

    def _tensor_batch(self, ims: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) float batch of a tensor input (uint8 scaled to 0-1); ValueError naming what is wrong otherwise."""
        x = ims[None] if ims.ndim == 3 else ims
        if not torch.jit.is_tracing():  # traced shapes are tensors: the checks would freeze into the trace as constants
            self._check_tensor(ims, x)
        if x.dtype == torch.uint8:
            x = (x.half() if self.model.fp16 else x.float()) / 255
        return x

    def _check_tensor(self, ims: torch.Tensor, x: torch.Tensor) -> None:
        """ValueError, one line naming the problem, unless x is a non-empty (B, C, H, W) float or uint8 batch that the
        model takes (C its input channels, H and W multiples of its stride)."""
        ch, s = self._channels(), int(self.stride)
        if x.ndim != 4:
            raise ValueError(f"AutoShape: a tensor input must be (B, {ch}, H, W) or ({ch}, H, W), got shape {tuple(ims.shape)}")
        if ims.dtype != torch.uint8 and not ims.is_floating_point():
            raise ValueError(f"AutoShape: a tensor input must be float (0-1) or uint8 (0-255), got {ims.dtype}")
        b, c, h, w = x.shape
        if b == 0:
            raise ValueError(f"AutoShape: the tensor batch is empty (shape {tuple(ims.shape)})")
        if c != ch:
            raise ValueError(f"AutoShape: the model takes {ch}-channel images, the tensor has {c} channels (shape {tuple(ims.shape)}, "
                             "expected (B, C, H, W))")
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"AutoShape: tensor height and width must be multiples of the stride {s}, got {h}x{w}; "
                             "pass the image as a numpy array to have it letterboxed")

    @staticmethod
    def _check_size(size: Any) -> tuple[int, int]:
        """`size` as (h, w): one positive integer or a sequence of one or two; ValueError naming `size` otherwise."""
        sizes = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
        if not isinstance(sizes, (list, tuple)) or len(sizes) not in (1, 2):
            raise ValueError(f"size must be a positive integer or (height, width) in pixels, got {size!r}")
        checked = check_img_size(list(sizes), flag="size")
        return int(checked[0]), int(checked[-1])

    def _check_options(self) -> None:
        """The filtering attributes, checked like the detect.py flags they mirror."""
        check_fraction("conf", self.conf)
        check_fraction("iou", self.iou)
        check_int("max_det", self.max_det)

    def _clock(self, device: torch.device, profile: bool) -> float:
        if profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _letterboxed(self, inputs: list[NamedImage], hw: tuple[int, int]) -> tuple[list[NamedImage], np.ndarray]:
        """The images that letterbox to the shared batch shape and their (B, 3, H, W) uint8 batch; each one that fails
        is skipped with one warning line, and ImageError names the first problem when none is left."""
        shape = self.model.fixed_imgsz or batch_shape([im.image.shape[:2] for im in inputs], hw, self.stride)
        kept: list[NamedImage] = []
        layers: list[np.ndarray] = []
        failures: list[str] = []
        for im in inputs:
            with skip_failed_image(im.name, failures, warn=False):
                layers.append(img_to_tensor_layout(letterbox(im.image, shape, auto=False)[0]))
                kept.append(im)
        settle_failures(failures, len(kept))
        return kept, np.stack(layers)

    def _detect(self, ims: Any, hw: tuple[int, int], augment: bool, device: torch.device, profile: bool) -> Detections:
        t0 = self._clock(device, profile)
        inputs, batch = self._letterboxed(load_inputs(ims, self.channel_order), hw)
        x = torch.from_numpy(batch).to(device)
        x = (x.half() if self.model.fp16 else x.float()) / 255
        t1 = self._clock(device, profile)
        with self._autocast(device):
            pred = self.model(x, augment=augment)
        t2 = self._clock(device, profile)
        dets = non_max_suppression(pred, self.conf, self.iou, self.classes, self.agnostic, self.multi_label,
                                   max_det=self.max_det, head=self.model.head_kind)
        for det, im in zip(dets, inputs):
            det[:, :4] = scale_boxes((x.shape[2], x.shape[3]), det[:, :4], (im.image.shape[0], im.image.shape[1]))
        t3 = self._clock(device, profile)
        per_image = tuple((b - a) * 1e3 / len(inputs) for a, b in ((t0, t1), (t1, t2), (t2, t3)))
        return Detections([im.image for im in inputs], dets, [im.name for im in inputs], self.names,
                          (per_image[0], per_image[1], per_image[2]), tuple(x.shape))
