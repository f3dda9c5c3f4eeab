"""Webcam and network-stream frames for detect.py (synchronous reads; one source per run)."""

from __future__ import annotations

from typing import Iterator, Union

import cv2
import numpy as np

from utils.data.images import letterbox, skip_failed_image
from utils.data.sources import capture_fps


class StreamError(ValueError):
    """A webcam or stream that cannot be opened; the message is one line."""


class LoadStreams:
    """Iterate letterboxed frames from a webcam index ('0') or an rtsp/rtmp/http URL until it ends; `fps` is the rate
    the capture declares (None when it declares none)."""

    mode = "stream"

    def __init__(
        self, source: str, img_size: Union[int, tuple[int, int]] = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1
    ) -> None:
        self.source, self.img_size, self.stride, self.auto = source, img_size, stride, auto
        self.vid_stride = max(1, int(vid_stride))
        self.cap = cv2.VideoCapture(int(source) if source.isnumeric() else source)
        if not self.cap.isOpened():
            raise StreamError(f"{source}: cannot open webcam or stream")
        self.fps = capture_fps(self.cap)  # None when the stream declares none: the writer then uses 30
        self.frame = 0

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray, list[np.ndarray], str]]:
        name = f"stream{self.source}" if self.source.isnumeric() else self.source
        while True:
            for _ in range(self.vid_stride - 1):
                self.cap.grab()
            ok, im0 = self.cap.read()
            if not ok:
                self.cap.release()
                return
            self.frame += 1
            im = self._prepare(name, im0)
            if im is None:  # a stream's frames share one size: the next ones would fail alike
                self.cap.release()
                return
            yield [name], im, [im0], f"{name} frame {self.frame}: "

    def _prepare(self, name: str, im0: np.ndarray) -> np.ndarray | None:
        """The letterboxed (1, 3, H, W) RGB frame, or None after one warning line naming the stream and the problem."""
        with skip_failed_image(f"{name} frame {self.frame} (rest of the stream)"):
            im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            return np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)[None])
        return None
