"""Detections: what the Python API returns for a batch of images (YOLOv5's results object: boxes, print, save, crop, pandas)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.paths import increment_path
from utils.plots import draw_detections
from utils.predictions import box_crops, describe, save_crops

XYXY_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "confidence", "class", "name")
XYWH_COLUMNS = ("xcenter", "ycenter", "width", "height", "confidence", "class", "name")
STAGES = ("pre-process", "inference", "NMS")


@dataclass
class DetectionFrames:
    """Detections as pandas DataFrames, one per image, in each box layout (results.pandas().xyxy[0])."""

    xyxy: list[Any]
    xyxyn: list[Any]
    xywh: list[Any]
    xywhn: list[Any]


class Detections:
    """Per-image (n, 6) [x1, y1, x2, y2, conf, cls] boxes in original pixels, with the images and names they belong to.

    Images are kept and drawn as BGR uint8 arrays, the layout OpenCV reads and writes.
    """

    def __init__(
        self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str], names: list[str],
        times: tuple[float, float, float] = (0.0, 0.0, 0.0), shape: tuple[int, ...] = (),
    ) -> None:
        if not len(ims) == len(pred) == len(files):
            raise ValueError(f"Detections: {len(ims)} images, {len(pred)} predictions and {len(files)} names must match")
        self.ims, self.pred, self.files, self.names = ims, [p[:, :6].detach().float().cpu() for p in pred], files, list(names)
        self.n = len(pred)
        self.t: tuple[float, float, float] = (float(times[0]), float(times[1]), float(times[2]))  # ms per image for each of STAGES
        self.s = tuple(int(v) for v in shape)  # the inference batch shape (B, 3, H, W)

    @property
    def speed(self) -> dict[str, float]:
        """Milliseconds per image by stage, YOLOv8's results.speed."""
        return dict(zip(("preprocess", "inference", "postprocess"), self.t))

    def _gains(self) -> list[torch.Tensor]:
        return [torch.tensor([im.shape[1], im.shape[0], im.shape[1], im.shape[0], 1.0, 1.0]) for im in self.ims]

    @property
    def xyxy(self) -> list[torch.Tensor]:
        """Per image: x1, y1, x2, y2 (pixels), confidence, class."""
        return self.pred

    @property
    def xywh(self) -> list[torch.Tensor]:
        """Per image: centre x, centre y, width, height (pixels), confidence, class."""
        return [torch.cat([xyxy2xywh(p[:, :4]), p[:, 4:]], 1) for p in self.pred]

    @property
    def xyxyn(self) -> list[torch.Tensor]:
        """xyxy divided by each image's width and height."""
        return [p / g for p, g in zip(self.xyxy, self._gains())]

    @property
    def xywhn(self) -> list[torch.Tensor]:
        """xywh divided by each image's width and height."""
        return [p / g for p, g in zip(self.xywh, self._gains())]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Detections:
        """The results of image i alone."""
        j = range(self.n)[i]  # IndexError and negative indices as for a list
        return Detections([self.ims[j]], [self.pred[j]], [self.files[j]], self.names, self.t, (1, *self.s[1:]))

    def __iter__(self) -> Iterator[Detections]:
        return iter(self.tolist())

    def tolist(self) -> list[Detections]:
        """One Detections per image."""
        return [self[i] for i in range(self.n)]

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """Annotated copies of the images (BGR), drawn by the same code as detect.py."""
        return [draw_detections(im, p, self.names, hide_labels=not labels) for im, p in zip(self.ims, self.pred)]

    def summary(self) -> str:
        """'image 1/2: 720x1280 2 circles, 1 triangle' per image, then the speed line."""
        lines = [f"image {i + 1}/{self.n}: {im.shape[0]}x{im.shape[1]} {describe(p, self.names)}"
                 for i, (im, p) in enumerate(zip(self.ims, self.pred))]
        pre, inf, nms = self.t
        lines.append(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at shape {self.s}")
        return "\n".join(lines)

    def print(self) -> None:
        """Print the summary to stdout."""
        print(self.summary())

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Detections: {self.n} image(s)>\n{self.summary()}"

    def show(self, labels: bool = True) -> None:
        """Open each annotated image in the system image viewer (PIL's Image.show)."""
        from PIL import Image

        for im, f in zip(self.render(labels), self.files):
            Image.fromarray(im[..., ::-1]).show(title=f)

    def save(self, labels: bool = True, save_dir: Union[str, Path] = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write the annotated images under save_dir (a new exp2, exp3, ... unless exist_ok) and return the folder."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for im, f in zip(self.render(labels), self.files):
            if not cv2.imwrite(str(folder / f), im):
                raise ValueError(f"{folder / f}: could not write image")
        print(f"Saved {self.n} image{'s' * (self.n != 1)} to {folder}")
        return folder

    def crop(self, save: bool = True, save_dir: Union[str, Path] = "runs/detect/exp", exist_ok: bool = False) -> list[dict[str, Any]]:
        """One dict per box (box, conf, cls, label, im, file); with save, crops/<class>/<image>_<i>.jpg as detect.py --save-crop."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True) if save else None
        crops = []
        for im, p, f in zip(self.ims, self.pred, self.files):
            for i, pixels in box_crops(p, im):
                cls = int(p[i, 5])
                name = self.names[cls] if cls < len(self.names) else str(cls)
                crops.append({"box": p[i, :4], "conf": p[i, 4], "cls": p[i, 5], "label": f"{name} {float(p[i, 4]):.2f}",
                              "im": pixels, "file": f})
            if folder is not None:
                save_crops(p, im, self.names, folder / "crops", Path(f).stem)
        if folder is not None:
            print(f"Saved {len(crops)} crop{'s' * (len(crops) != 1)} to {folder / 'crops'}")
        return crops

    def pandas(self) -> DetectionFrames:
        """The boxes as DataFrames with YOLOv5's columns (xmin ymin xmax ymax confidence class name, or the xywh ones)."""
        import pandas as pd

        def frames(boxes: list[torch.Tensor], columns: tuple[str, ...]) -> list[Any]:
            out = []
            for p in boxes:
                rows = [[*r[:5], int(r[5]), self.names[int(r[5])] if int(r[5]) < len(self.names) else str(int(r[5]))]
                        for r in p.tolist()]
                out.append(pd.DataFrame(rows, columns=list(columns)))
            return out

        return DetectionFrames(frames(self.xyxy, XYXY_COLUMNS), frames(self.xyxyn, XYXY_COLUMNS),
                               frames(self.xywh, XYWH_COLUMNS), frames(self.xywhn, XYWH_COLUMNS))
