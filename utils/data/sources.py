"""Inference sources for detect.py: image files, folders, globs, *.txt lists, video files and image URLs (downloaded to a
temporary folder first), letterboxed for the model."""

from __future__ import annotations

import glob
import logging
import math
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from utils.data.dataset_config import DatasetError
from utils.data.images import (
    IMG_FORMATS,
    VID_FORMATS,
    ImageError,
    img_to_tensor_layout,
    letterbox,
    load_image,
    skip_failed_image,
    warn_if_multipage,
)
from utils.files import safe_component

LOGGER = logging.getLogger("mobile_yolo")
URL_TIMEOUT = 10.0  # seconds to connect and between reads
MAX_DOWNLOAD_BYTES = 64 << 20  # an image URL larger than this is refused rather than held in memory
MAX_FPS = 1000.0  # a capture declaring more (some streams report 90000) declares no usable frame rate


def is_url(text: str) -> bool:
    """True for http:// and https:// addresses (the only schemes downloaded)."""
    return urllib.parse.urlsplit(str(text)).scheme.lower() in ("http", "https")


def url_file_name(url: str) -> str:
    """The file name an http(s) URL's path ends in (query string and fragment dropped, %-escapes decoded), or ''."""
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name


def is_image_url(text: str) -> bool:
    """True for an http(s) URL whose path ends in an image suffix (read as an image, not opened as a stream)."""
    return is_url(text) and _suffix(url_file_name(text)) in IMG_FORMATS


def fetch_url(url: str, timeout: float = URL_TIMEOUT, limit: int | None = None) -> bytes:
    """The body of an http(s) URL, refused over `limit` bytes (default MAX_DOWNLOAD_BYTES); ImageError in one line naming
    the URL when it cannot be downloaded (offline, HTTP error) or is too large."""
    limit = MAX_DOWNLOAD_BYTES if limit is None else limit
    declared = ""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            declared = str(r.headers.get("Content-Length") or "").strip()
            too_big = declared.isdigit() and int(declared) > limit
            data = b"" if too_big else r.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url}: cannot download image (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError, ValueError) as e:
        reason = str(getattr(e, "reason", None) or e).splitlines()
        raise ImageError(f"{url}: cannot download image ({reason[0] if reason and reason[0] else type(e).__name__}); "
                         "check the network or pass a local file") from None
    if too_big or len(data) > limit:
        raise ImageError(f"{url}: image download is over the limit of {limit:,} bytes (utils.data.sources.MAX_DOWNLOAD_BYTES), refused")
    return data


def download_image(url: str, folder: Union[str, Path]) -> Path:
    """Download an image URL into `folder` under its URL file name (made safe) and return the file (YOLOv5 reads image
    URLs as files); ImageError in one line naming the URL when it cannot be downloaded."""
    path = Path(folder) / safe_component(url_file_name(url), fallback="image.jpg")
    path.write_bytes(fetch_url(url))
    return path


def capture_fps(cap: cv2.VideoCapture) -> float | None:
    """The frame rate a video or stream declares, or None when it declares no usable one (0, NaN, absurdly high)."""
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    return fps if math.isfinite(fps) and 0.0 < fps <= MAX_FPS else None


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
    """Iterate images and video frames -> (path, letterboxed RGB CHW uint8, original BGR, description).

    `fps` is the frame rate of the video being read (None while reading images, or when the video declares none), so
    the annotated copy is written at the source's rate. Image URLs are downloaded to a temporary folder that lives as
    long as the loader."""

    def __init__(self, path: Union[str, Path, list], img_size: Union[int, tuple[int, int]] = 640, stride: int = 32,
                 auto: bool = True) -> None:
        self._downloads: tempfile.TemporaryDirectory[str] | None = None
        self.origins: dict[str, str] = {}  # downloaded file -> its URL (what the log lines name)
        self.fps: float | None = None
        self.files = expand_source(self._download_urls(path))
        if not self.files:
            raise DatasetError(f"{path}: no images or videos found (supported: {', '.join(IMG_FORMATS + VID_FORMATS)})")
        self.is_video = [_suffix(f) in VID_FORMATS for f in self.files]
        self.img_size, self.stride, self.auto = img_size, stride, auto
        self.nf, self.skipped = len(self.files), 0
        self.cap: cv2.VideoCapture | None = None
        self.frame, self.frames = 0, 0

    def __len__(self) -> int:
        return self.nf

    def _download_urls(self, path: Union[str, Path, list]) -> Union[str, Path, list]:
        """`path` with each image URL replaced by its downloaded file (each in its own subfolder: equal names never clash)."""
        items = list(path) if isinstance(path, (list, tuple)) else [path]
        if not any(isinstance(s, str) and is_image_url(s) for s in items):
            return path
        if self._downloads is None:
            self._downloads = tempfile.TemporaryDirectory(prefix="mobile_yolo_url_")
        out: list = []
        for i, s in enumerate(items):
            if isinstance(s, str) and is_image_url(s):
                folder = Path(self._downloads.name) / str(i)
                folder.mkdir()
                file = str(download_image(s, folder))
                self.origins[file] = s
                s = file
            out.append(s)
        return out

    def _open_video(self, path: str) -> bool:
        """Open a video and take its frame rate; False (with a warning) when OpenCV cannot read it."""
        self.cap = cv2.VideoCapture(path)
        self.frame, self.frames = 0, int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.fps = capture_fps(self.cap)
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
            self.fps = None
            item = self._load(path)
            if item is None:
                self.skipped += 1
                continue
            yield path, item[0], item[1], f"image {i + 1}/{self.nf} {self.origins.get(path, path)}: "

    def _load(self, path: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(letterboxed, original) of one image file, or None after one warning line naming the file and the problem."""
        with skip_failed_image(path):
            im0 = load_image(path)
            warn_if_multipage(path)
            return self._prepare(im0), im0
        return None
