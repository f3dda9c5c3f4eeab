"""Inference sources for detect.py: image files, folders, globs, *.txt lists and video files, letterboxed for the model."""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from utils.data.dataset_config import DatasetError
from utils.data.images import IMG_FORMATS, VID_FORMATS, img_to_tensor_layout, letterbox, load_image, skip_failed_image

LOGGER = logging.getLogger("mobile_yolo")


def _suffix(p: str) -> str:
    return p.rsplit(".", 1)[-1].lower() if "." in Path(p).name else ""


def expand_source(source: Union[str, Path, list]) -> list[str]:
    """Expand a file, folder, glob pattern, *.txt list or list of those into sorted media file paths."""
    files: list[str] = []
    for s in source if isinstance(source, (list, tuple)) else [source]:
        s = str(Path(s).expanduser())
        p = Path(s)
        if any(c in s for c in "*?["):
            files += sorted(glob.glob(s, recursive=True))
        elif p.is_dir():
            files += sorted(str(f) for f in p.iterdir() if f.is_file())
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
            files += expand_source([ln if Path(ln).is_absolute() else str(p.parent / ln) for ln in lines]) if lines else []
        elif p.is_file():
            files.append(s)
        else:
            raise FileNotFoundError(f"{s}: source does not exist")
    return [f for f in files if _suffix(f) in IMG_FORMATS + VID_FORMATS]


class LoadImages:
    """Iterate images and video frames -> (path, letterboxed RGB CHW uint8, original BGR, description)."""

    def __init__(self, path: Union[str, Path, list], img_size: Union[int, tuple[int, int]] = 640, stride: int = 32,
                 auto: bool = True) -> None:
        self.files = expand_source(path)
        if not self.files:
            raise DatasetError(f"{path}: no images or videos found (supported: {', '.join(IMG_FORMATS + VID_FORMATS)})")
        self.is_video = [_suffix(f) in VID_FORMATS for f in self.files]
        self.img_size, self.stride, self.auto = img_size, stride, auto
        self.nf, self.skipped = len(self.files), 0
        self.cap: cv2.VideoCapture | None = None
        self.frame, self.frames = 0, 0

    def __len__(self) -> int:
        return self.nf

    def _open_video(self, path: str) -> bool:
        """Open a video; False (with a warning) when OpenCV cannot read it."""
        self.cap = cv2.VideoCapture(path)
        self.frame, self.frames = 0, int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if not self.cap.isOpened():
            LOGGER.warning(f"WARNING: {path}: cannot open video, skipped")
            self.cap.release()
            self.cap = None
            return False
        return True

    def _video_frames(self, i: int, path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
        if not self._open_video(path):
            self.skipped += 1
            return
        cap = self.cap
        assert cap is not None  # _open_video succeeded
        try:
            while True:
                ok, im0 = cap.read()
                if not ok:
                    break
                self.frame += 1
                im = self._prepare_frame(path, im0)
                if im is None:
                    return  # every frame of a video has the same size: the rest would fail alike
                yield path, im, im0, f"video {i + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
            self._check_frame_count(path)
        finally:
            cap.release()
            self.cap = None

    def _prepare_frame(self, path: str, im0: np.ndarray) -> np.ndarray | None:
        """The letterboxed frame, or None after one warning line naming the video, the frame and the problem."""
        with skip_failed_image(f"{path} frame {self.frame} (rest of the video)"):
            return self._prepare(im0)
        return None

    def _check_frame_count(self, path: str) -> None:
        """Warn when a video ended before the frame count its container declares (a truncated or half-written file);
        whatever the container, since OpenCV reads what is there and reports the early end as a normal one."""
        if self.frames > 0 and self.frame < self.frames:
            LOGGER.warning(f"WARNING: {path}: video ended after {self.frame} of the {self.frames} frames its header "
                           "declares (truncated or damaged file?); the frames read were processed")

    def _prepare(self, im0: np.ndarray) -> np.ndarray:
        return img_to_tensor_layout(letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0])

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
        for i, (path, video) in enumerate(zip(self.files, self.is_video)):
            if video:
                yield from self._video_frames(i, path)
                continue
            item = self._load(path)
            if item is None:
                self.skipped += 1
                continue
            yield path, item[0], item[1], f"image {i + 1}/{self.nf} {path}: "

    def _load(self, path: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(letterboxed, original) of one image file, or None after one warning line naming the file and the problem."""
        with skip_failed_image(path):
            im0 = load_image(path)
            return self._prepare(im0), im0
        return None
