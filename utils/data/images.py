"""Image reading (orientation-aware, any bit depth/channels -> BGR uint8), letterboxing and tensor layout."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image, ImageOps

from utils.files import first_line

LOGGER = logging.getLogger("mobile_yolo")
IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
# The one image-size limit of every reader (detect/val sources via load_image, dataset scanning via verify_image):
# images whose header declares more pixels than this are refused before any pixel is decoded. The value is PIL's
# default decompression-bomb threshold (1 GiB / 4 bytes / 3 = 89,478,485 px, e.g. 9459x9459; a 20000x20000 PNG of a
# few hundred KB would otherwise decode into GBs). Raise it here, once, for legitimately huge images.
MAX_IMAGE_PIXELS = 89_478_485
JPEG_SUFFIXES = (".jpg", ".jpeg")
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# What one image can fail with while it is decoded, resized, run through the model or drawn (bad pixels, an OpenCV
# assertion, a shape the model cannot take): prediction skips that image and goes on. Not caught: OSError (a full disk
# fails every image alike, and the scripts report it once), MemoryError, and programming errors such as TypeError.
PER_IMAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, cv2.error, RuntimeError, ArithmeticError, IndexError)


class ImageError(ValueError):
    """An image file that cannot be decoded; the message is one line naming the file."""


def image_failure(name: Union[str, Path], e: BaseException) -> str:
    """'name: problem' in one line for an image that failed (the name is not repeated when the message starts with it)."""
    text = first_line(e, limit=300)
    return text if text.startswith((str(name), str(Path(name)))) else f"{name}: {text}"


@contextlib.contextmanager
def skip_failed_image(name: Union[str, Path], failures: list[str] | None = None, warn: bool = True) -> Iterator[None]:
    """Run one image's work; a PER_IMAGE_ERRORS failure ends it with one 'WARNING: name: problem, skipped' line (the
    'name: problem' text appended to `failures`) instead of ending the run, so the other images are still done and saved.
    warn=False only collects the text (see settle_failures)."""
    try:
        yield
    except PER_IMAGE_ERRORS as e:
        problem = image_failure(name, e)
        if warn:
            LOGGER.warning(f"WARNING: {problem}, skipped")
        if failures is not None:
            failures.append(problem)


def _first_of(failures: list[str]) -> str:
    return failures[0] + (f" (and {len(failures) - 1} more failed)" if len(failures) > 1 else "")


def check_some_succeeded(source: Union[str, Path], failures: list[str], done: int) -> None:
    """After a run that skipped failed images: ValueError (one line) if none succeeded, as the cause is then likely not
    the images (e.g. an export for another size); otherwise the others' results stand."""
    if failures and not done:
        raise ValueError(f"{source}: no image could be processed; {_first_of(failures)}")


def settle_failures(failures: list[str], done: int) -> None:
    """For failures collected quietly: ImageError naming the first when no image is left, else one warning line each."""
    if failures and not done:
        raise ImageError(_first_of(failures))
    for problem in failures:
        LOGGER.warning(f"WARNING: {problem}, skipped")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit / float pixel data down to 0-255 uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    src = arr.dtype
    hi = float(arr.max()) if arr.size else 0.0
    arr = arr.astype(np.float32)
    if hi > 65535.0:  # 32-bit data: stretch to the full range
        arr = arr * (255.0 / hi)
    elif hi > 255.0 or src == np.uint16:
        arr = arr / 257.0  # 16-bit -> 8-bit
    elif 0.0 < hi <= 1.0 and np.issubdtype(src, np.floating):
        arr = arr * 255.0  # float images in [0, 1]
    return arr.clip(0, 255).round().astype(np.uint8)


def _to_bgr3(arr: np.ndarray, rgb: bool) -> np.ndarray:
    """Any channel layout (gray, gray+alpha, RGB, RGBA) -> contiguous 3-channel BGR."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c in (2, 4):  # drop alpha
        arr = arr[:, :, : c - 1]
        c -= 1
    if c == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    arr = arr[:, :, :3]
    return np.ascontiguousarray(arr[:, :, ::-1] if rgb else arr)


def _pil_array(im: Image.Image) -> np.ndarray:
    """PIL image -> numpy array, widening 16-bit modes PIL stores as 'I;16' / 'I'."""
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    return np.asarray(im)


def pil_to_bgr(im: Image.Image) -> np.ndarray:
    """An upright (EXIF orientation applied) HxWx3 BGR uint8 array of a PIL image of any mode or bit depth."""
    return _to_bgr3(_to_uint8(_pil_array(ImageOps.exif_transpose(im))), rgb=True)


def array_to_bgr(arr: np.ndarray, channel_order: str = "bgr") -> np.ndarray:
    """HxW, HxWxC or CxHxW (C <= 4) array of any dtype -> HxWx3 BGR uint8; `channel_order` says what the colour channels are."""
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    if arr.ndim == 3 and arr.shape[0] <= 4 < arr.shape[2]:
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[2] > 4):
        raise ImageError(f"numpy image must be HxW, HxWxC or CxHxW with C <= 4 channels, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ImageError(f"numpy image must hold numbers, got dtype {arr.dtype}")
    return _to_bgr3(_to_uint8(np.asarray(arr)), rgb=channel_order == "rgb")


def _read_pil(path: Union[Path, io.BytesIO]) -> np.ndarray | None:
    """Decode a file (or in-memory bytes) with PIL, applying EXIF orientation; None if PIL cannot handle it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return pil_to_bgr(im)
    except Exception:
        return None


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode an encoded image held in memory (e.g. downloaded) like load_image decodes a file; ImageError names `name`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image is over the limit of {MAX_IMAGE_PIXELS:,} pixels (utils.data.images.MAX_IMAGE_PIXELS)") from None
    except Exception:
        raise ImageError(f"{name}: cannot decode image (corrupt, truncated or unsupported format)") from None
    _check_pixels(name, w, h)
    img = _read_pil(io.BytesIO(data))
    if img is None or img.size == 0:
        raise ImageError(f"{name}: cannot decode image (corrupt, truncated or unsupported format)")
    return img


def _read_cv2(path: Path) -> np.ndarray | None:
    """Decode with OpenCV (keeps bit depth and alpha); None on failure."""
    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if arr is None:
        return None
    return _to_bgr3(_to_uint8(arr), rgb=False)


def _read_jpeg(path: Path, reduce: int) -> np.ndarray | None:
    """Decode a JPEG with OpenCV's libjpeg-turbo (about 4x faster than through PIL), EXIF orientation applied; at
    1/reduce of its size when reduce is 2, 4 or 8 (scaled in the DCT, far cheaper than decoding then shrinking)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    flag = _REDUCED_FLAGS.get(reduce, cv2.IMREAD_COLOR)
    arr = cv2.imdecode(data, flag) if data.size else None
    return arr if arr is not None and arr.ndim == 3 and arr.shape[2] == 3 else None


def jpeg_reduction(path: Union[str, Path], shape_hw: tuple[int, int], img_size: int) -> int:
    """The largest DCT reduction (1, 2, 4 or 8) that still leaves a JPEG's long side >= img_size."""
    if Path(path).suffix.lower() not in JPEG_SUFFIXES:
        return 1
    long_side = max(shape_hw)
    return next((f for f in (8, 4, 2) if long_side >= f * img_size), 1)


def _check_pixels(path: Union[str, Path], w: int, h: int) -> None:
    """Raise ImageError (one line) if w x h is over MAX_IMAGE_PIXELS."""
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{path}: image is {w}x{h} = {w * h:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
                         f"(utils.data.images.MAX_IMAGE_PIXELS)")


def check_image_size(path: Union[str, Path]) -> tuple[int, int] | None:
    """Declared (w, h) from the header only (nothing decoded); ImageError if over MAX_IMAGE_PIXELS, None if unparsable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: our own limit below decides
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:  # PIL refuses headers over twice its own limit before giving the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL allows"
        limit = f"{MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS in utils/data/images.py)"
        raise ImageError(f"{path}: image declares {n}, over the limit of {limit}") from None
    except Exception:
        return None  # not a format PIL knows (or a broken header): the decoders decide
    _check_pixels(path, w, h)
    return w, h


def warn_if_multipage(path: Union[str, Path]) -> None:
    """One warning when a TIFF holds several pages: predictions read its first page only (the one viewers show)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return
    with contextlib.suppress(Exception), Image.open(path) as im:
        pages = int(getattr(im, "n_frames", 1))
        if pages > 1:
            LOGGER.warning(f"WARNING: {path}: a TIFF of {pages} pages; only the first page is read")


def load_image(path: Union[str, Path], reduce: int = 1) -> np.ndarray:
    """Read an image as an upright HxWx3 BGR uint8 array (cv2 convention), or raise ImageError (MAX_IMAGE_PIXELS enforced).

    reduce (2, 4 or 8) decodes JPEGs at that fraction of their size (see jpeg_reduction); other formats ignore it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    check_image_size(path)  # header only, before any decoding
    suffix = path.suffix.lower()
    if suffix in JPEG_SUFFIXES:  # always 8-bit; PIL remains the fallback for the odd file OpenCV refuses
        img = _read_jpeg(path, reduce)
        img = _read_pil(path) if img is None else img
    elif suffix == ".png":  # cv2 keeps 16-bit PNG depth exactly; PNG has no EXIF rotation in practice
        img = _read_cv2(path)
        img = _read_pil(path) if img is None else img
    else:
        img = _read_pil(path)
        img = _read_cv2(path) if img is None else img
    if img is None or img.size == 0:
        raise ImageError(f"{path}: cannot decode image (corrupt, truncated or unsupported format)")
    _check_pixels(path, img.shape[1], img.shape[0])  # formats only OpenCV parses could not be checked before decoding
    return img


def letterbox(
    img: np.ndarray,
    new_shape: Union[int, tuple[int, int]] = 640,
    color: tuple[int, int, int] = (114, 114, 114),
    auto: bool = True,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping aspect ratio and pad to new_shape (or, with auto, to the next stride multiple).

    A side that would round to 0 pixels (a 1x3000 image into 640) keeps 1 pixel, so degenerate images still letterbox.
    """
    h0, w0 = img.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = max(1, int(round(w0 * r))), max(1, int(round(h0 * r)))
    dw, dh = new_shape[1] - new_w, new_shape[0] - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    half_w, half_h = dw / 2, dh / 2
    if (w0, h0) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(half_h - 0.1)), int(round(half_h + 0.1))
    left, right = int(round(half_w - 0.1)), int(round(half_w + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, (new_w / w0, new_h / h0), (half_w, half_h)


def resize_long_side(img: np.ndarray, img_size: int, augment: bool = False) -> np.ndarray:
    """Scale so the longer side equals img_size (area interpolation when shrinking for eval)."""
    h0, w0 = img.shape[:2]
    r = img_size / max(h0, w0)
    if r == 1:
        return img
    interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    size = (max(1, int(round(w0 * r))), max(1, int(round(h0 * r))))
    return cv2.resize(img, size, interpolation=interp)


def img_to_tensor_layout(img: np.ndarray) -> np.ndarray:
    """BGR HWC uint8 -> RGB CHW contiguous uint8 (the model's input layout)."""
    return np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])
