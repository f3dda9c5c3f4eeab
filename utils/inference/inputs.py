"""Everything the Python API accepts as images -> named upright BGR uint8 arrays (files, folders, globs, URLs, arrays, PIL)."""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from utils.data.images import (
    IMG_FORMATS,
    ImageError,
    array_to_bgr,
    decode_image_bytes,
    load_image,
    pil_to_bgr,
    settle_failures,
    skip_failed_image,
    warn_if_multipage,
)
from utils.data.sources import MAX_DOWNLOAD_BYTES, URL_TIMEOUT, expand_source, fetch_url, is_url
from utils.files import safe_component

LOGGER = logging.getLogger("mobile_yolo")

SAVE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # names kept as given; others are saved as .jpg
ACCEPTED = "a file, folder, glob or http(s) URL (str or Path), a numpy HxWx3 array, a PIL image, or a list of those"
ImageSource = Union[str, Path, np.ndarray, Image.Image]
__all__ = ["ACCEPTED", "MAX_DOWNLOAD_BYTES", "URL_TIMEOUT", "ImageSource", "NamedImage", "is_url", "load_inputs", "read_url"]


@dataclass
class NamedImage:
    """One input image: the file name results are saved under and its pixels (HxWx3 BGR uint8, upright)."""

    name: str
    image: np.ndarray


def read_url(url: str, timeout: float = URL_TIMEOUT) -> np.ndarray:
    """Download and decode one image URL; offline or failing, one ImageError line naming the URL and the reason."""
    return decode_image_bytes(fetch_url(url, timeout), url)


def _paths(text: str) -> list[str]:
    """Image files a path, folder or glob names. A video named directly is refused; one met in a folder or glob (a
    .gif counts) is skipped with one warning line, so the folder's images are still read."""
    files = expand_source(text)
    videos = [f for f in files if f.rsplit(".", 1)[-1].lower() not in IMG_FORMATS]
    if videos and files == [str(Path(text).expanduser())]:
        raise ImageError(f"{videos[0]}: a video; the hub model reads images: use YOLO(...).predict(source=...) "
                         "(utils.api) or detect.py --source for videos")
    for video in videos:
        LOGGER.warning(f"WARNING: {video}: a video or animation, not an image; skipped (read videos with "
                       "YOLO(...).predict or detect.py)")
    files = [f for f in files if f not in videos]
    if not files:
        raise ImageError(f"{text}: no images found (supported: {', '.join(IMG_FORMATS)})")
    return files


def _load_files(files: list[str], failures: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, BGR image) of each file that reads; the 'file: problem' of each that does not goes to `failures`."""
    pairs = []
    for f in files:
        with skip_failed_image(f, failures, warn=False):
            pairs.append((Path(f).name, load_image(f)))
            warn_if_multipage(f)
    return pairs


def _expand(item: Any, index: int, channel_order: str, failures: list[str]) -> list[tuple[str, np.ndarray]]:
    """(suggested name, BGR image) pairs for one input item; a folder's or glob's unreadable files go to `failures`."""
    if isinstance(item, (str, Path)):
        text = str(item)
        if is_url(text):
            name = Path(urllib.parse.urlsplit(text).path).name or f"image{index}.jpg"
            return [(name, read_url(text))]
        return _load_files(_paths(text), failures)
    if isinstance(item, np.ndarray):
        return [(f"image{index}.jpg", array_to_bgr(item, channel_order))]
    if isinstance(item, Image.Image):
        filename = getattr(item, "filename", "") or ""
        return [(Path(filename).name or f"image{index}.jpg", pil_to_bgr(item))]
    raise TypeError(f"cannot read {type(item).__name__} as an image; accepted: {ACCEPTED}")


def _unique_names(names: list[str]) -> list[str]:
    """Names safe as one path component and distinct (a repeated name gets _2, _3, ...), with an image suffix."""
    seen: set[str] = set()
    out = []
    for name in names:
        p = Path(safe_component(name, fallback="image.jpg"))
        stem, suffix = p.stem, p.suffix if p.suffix.lower() in SAVE_SUFFIXES else ".jpg"
        candidate, k = f"{stem}{suffix}", 1
        while candidate.lower() in seen:
            k += 1
            candidate = f"{stem}_{k}{suffix}"
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def _item_name(item: Any, index: int) -> str:
    """What a failure message calls an input item: its path or URL, else its position and kind."""
    return str(item) if isinstance(item, (str, Path)) else f"image{index} ({type(item).__name__})"


def load_inputs(ims: Any, channel_order: str = "bgr") -> list[NamedImage]:
    """Read one input or a list of inputs (a folder or glob counts as its images) into named BGR images.

    An image that cannot be read is skipped with one warning line naming it; ImageError (the first problem) when none is
    left. A missing path (FileNotFoundError) or an object of another type (TypeError) is the caller's mistake and raises."""
    items = list(ims) if isinstance(ims, (list, tuple)) else [ims]
    pairs: list[tuple[str, np.ndarray]] = []
    failures: list[str] = []
    for i, item in enumerate(items):
        with skip_failed_image(_item_name(item, i), failures, warn=False):
            pairs += _expand(item, i, channel_order, failures)
    settle_failures(failures, len(pairs))
    if not pairs:
        raise ImageError("no images given")
    names = _unique_names([name for name, _ in pairs])
    return [NamedImage(name, image) for name, (_, image) in zip(names, pairs)]
