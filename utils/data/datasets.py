"""YOLO-format training/validation dataset: scanning with a label cache, letterbox/mosaic loading, augmentation, loaders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data import disk_cache
from utils.data.augmentations import Warp, augment_hsv, flip_labels, keep_visible_boxes, mixup, random_perspective
from utils.data.dataset_config import DatasetError
from utils.data.images import IMG_FORMATS, ImageError, check_image_size, jpeg_reduction, letterbox, load_image, resize_long_side
from utils.data.labels import img2label_paths, read_label_file
from utils.files import atomic_write_text, resolve_path

LOGGER = logging.getLogger("mobile_yolo")
CACHE_VERSION = 1
MIN_IMAGE_SIDE = 10
# Augmentation defaults when augment=True but no hyp is given (the scratch-low values).
DEFAULT_AUG_HYP = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
                   "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0}
RAM_CACHE_MARGIN = 0.1  # --cache ram is used only when the images plus this fraction fit in the available memory (YOLOv5's)
# (limit, usage) files of a container's memory cgroup, v2 then v1: its headroom can be below the machine's MemAvailable
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
PathLike = Union[str, Path]
# lb_file, nc -> (the label fields of a cache record, one-line note or None, status): what scanning stores per image
LabelReader = Callable[[str, Union[int, None]], tuple[dict[str, Any], Union[str, None], str]]


def collect_image_files(path: Union[PathLike, list[PathLike]], prefix: str = "") -> list[str]:
    """Image files from folders (recursive), *.txt lists (entries relative to the list's folder) or lists of those."""
    files: list[str] = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = Path(p).expanduser()
        if p.is_dir():
            files += [str(f) for f in p.rglob("*") if f.is_file()]
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                if line.strip():
                    files.append(_list_entry(p, line.strip()))
        elif p.is_file():
            files.append(str(p))
        else:
            raise DatasetError(f"{prefix}{p}: image folder or list file does not exist")
    files = sorted({f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS})
    if not files:
        raise DatasetError(f"{prefix}{path}: no images found (supported formats: {', '.join(IMG_FORMATS)})")
    return files


def _list_entry(list_file: Path, entry: str) -> str:
    """An image list entry as a path: relative ones resolved against the list's folder; one that cannot be resolved (a
    symbolic link loop) stays as written, to be reported as a corrupt image when it is verified."""
    q = Path(entry)
    if q.is_absolute():
        return str(q)
    try:
        return str(resolve_path(list_file.parent / q, DatasetError, str(list_file), "entry"))
    except DatasetError:
        return str(list_file.parent / q)


def verify_image(im_file: str) -> tuple[tuple[int, int] | None, str | None]:
    """Check an image without fully decoding it -> ((h, w) upright, None) or (None, one-line reason)."""
    try:
        check_image_size(im_file)  # the same size limit (utils.data.images.MAX_IMAGE_PIXELS) and message as load_image
    except ImageError as e:
        return None, str(e)
    try:
        with Image.open(im_file) as im:
            im.verify()
        with Image.open(im_file) as im:
            w, h = im.size
            fmt = (im.format or "").lower()
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation with a 90-degree turn
                w, h = h, w
        if fmt in ("jpeg", "mpo"):
            with open(im_file, "rb") as f:
                f.seek(-2, 2)
                if f.read() != b"\xff\xd9":  # no end-of-image marker: make sure it still decodes fully
                    with Image.open(im_file) as im:
                        im.load()
    except Exception as e:
        return None, f"{im_file}: corrupt image ignored ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if min(h, w) < MIN_IMAGE_SIDE:
        return None, f"{im_file}: image ignored, size {w}x{h} is under {MIN_IMAGE_SIDE} px"
    return (h, w), None


def read_box_labels(lb_file: str, nc: int | None) -> tuple[dict[str, Any], str | None, str]:
    """The detection fields of a cache record ({"labels": (n, 5) rows}), note and status (the default LabelReader)."""
    labels, msg, status = read_label_file(lb_file, nc)
    return {"labels": labels.tolist()}, msg, status


def _verify_pair(args: tuple[str, str, int | None, LabelReader]) -> dict[str, Any]:
    """Verify one image and its label file; the record stored in the label cache."""
    im_file, lb_file, nc, read_labels = args
    shape, msg = verify_image(im_file)
    if shape is None:
        return {"im_file": im_file, "status": "corrupt", "msg": msg}
    fields, msg, status = read_labels(lb_file, nc)
    missing = status == "background" and not os.path.isfile(lb_file)
    return {"im_file": im_file, "shape": list(shape), **fields, "status": status, "msg": msg, "missing": missing}


def _files_hash(files: list[str], nc: int | None, tag: str = "") -> str:
    """Hash of paths, sizes and modification times, so any changed file invalidates the cache (tag: the record kind)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}{tag}".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()


def _load_cache(cache_path: Path, key: str) -> list[dict] | None:
    """Records from a JSON label cache if it matches key; None for a missing, stale or unreadable cache."""
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
        if data.get("version") == CACHE_VERSION and data.get("hash") == key:
            return data["records"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _is_label_cache(path: Path) -> bool:
    """True when `path` holds a label cache this project wrote (any version), so replacing it loses nothing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"version", "hash", "records"} <= set(data)


def _save_cache(cache_path: Path, key: str, records: list[dict], prefix: str) -> None:
    """Write the label cache atomically; warn (do not fail) on read-only folders or a foreign file in its place."""
    if cache_path.exists() and not _is_label_cache(cache_path):
        LOGGER.warning(f"{prefix}WARNING: {cache_path} exists and is not a label cache; not overwriting it, cache not saved")
        return
    try:
        atomic_write_text(cache_path, json.dumps({"version": CACHE_VERSION, "hash": key, "records": records}))
        LOGGER.info(f"{prefix}New cache created: {cache_path}")
    except OSError as e:
        LOGGER.warning(f"{prefix}WARNING: cache dir {cache_path.parent} is not writeable, cache not saved ({e})")


def scan_dataset(im_files: list[str], cache_path: Path, nc: int | None, workers: int, prefix: str, desc: str,
                 read_labels: LabelReader = read_box_labels, tag: str = "") -> tuple[list[dict], dict]:
    """Verify all image/label pairs (or reuse a valid cache); returns (records, counts) and logs a summary.

    read_labels makes the label fields of each record; tag names that kind of record in the cache key."""
    lb_files = img2label_paths(im_files)
    key = _files_hash(im_files + lb_files, nc, tag)
    records = _load_cache(cache_path, key)
    cached = records is not None
    if records is None:
        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
            jobs = pool.map(_verify_pair, [(i, lb, nc, read_labels) for i, lb in zip(im_files, lb_files)])
            records = list(tqdm(jobs, total=len(im_files), desc=f"{prefix}Scanning {desc}", disable=len(im_files) < 1000))
        _save_cache(cache_path, key, records, prefix)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "background", "repaired", "corrupt")}
    counts["missing"] = sum(bool(r.get("missing")) for r in records)
    counts["images"] = len(records) - counts["corrupt"]
    for r in records:
        if r["msg"]:
            LOGGER.warning(f"{prefix}WARNING: {r['msg']}")
    LOGGER.info(f"{prefix}Scanning {desc}{' (cached)' if cached else ''}: {counts['images']} images, {counts['background']} backgrounds "
                f"({counts['missing']} without label file), {counts['corrupt']} corrupt, {counts['repaired']} repaired")
    return records, counts


def _meminfo_available(meminfo: PathLike) -> int | None:
    """MemAvailable of a /proc/meminfo file in bytes, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(meminfo).read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return None


def _cgroup_headroom(cgroup: Sequence[tuple[PathLike, PathLike]]) -> int | None:
    """Bytes the container's memory cgroup still allows (limit - usage), or None outside one or without a limit."""
    for limit_file, usage_file in cgroup:
        with contextlib.suppress(OSError, ValueError):  # v2 writes "max" when there is no limit
            return int(Path(limit_file).read_text().strip()) - int(Path(usage_file).read_text().strip())
    return None


def available_ram(meminfo: PathLike = "/proc/meminfo", cgroup: Sequence[tuple[PathLike, PathLike]] = CGROUP_MEMORY) -> int | None:
    """Bytes of memory this process can still fill: psutil's figure if it is installed, else meminfo's MemAvailable,
    lowered to the headroom of the container's memory cgroup ((limit, usage) files); None when the system tells neither."""
    try:
        import psutil  # optional, not a requirement

        avail: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        avail = _meminfo_available(meminfo)
    headroom = _cgroup_headroom(cgroup)
    return headroom if avail is None else avail if headroom is None else min(avail, headroom)


def rect_batch_shapes(shapes_hw: np.ndarray, batch_size: int, img_size: int, stride: int, pad: float) -> tuple[np.ndarray, np.ndarray]:
    """Sort order by aspect ratio and per-batch (h, w) shapes (stride multiples) for rectangular batches."""
    ar = shapes_hw[:, 0] / shapes_hw[:, 1]
    order = ar.argsort()
    ar = ar[order]
    nb = math.ceil(len(ar) / batch_size)
    shapes = np.ones((nb, 2))
    for b in range(nb):
        chunk = ar[b * batch_size:(b + 1) * batch_size]
        lo, hi = chunk.min(), chunk.max()
        if hi < 1:
            shapes[b] = [hi, 1]
        elif lo > 1:
            shapes[b] = [1, 1 / lo]
    return order, (np.ceil(shapes * img_size / stride + pad) * stride).astype(int)


class LoadImagesAndLabels(Dataset):
    """YOLO dataset: item -> (uint8 RGB CHW image, (n, 6) [0, cls, cx, cy, w, h] labels, path, shapes for val rescaling).

    Subclasses that keep more per instance override read_labels, cache_suffix and cache_tag (their own label cache),
    _set_records and _reorder (their own fields), label_columns and _placed_labels (extra columns of the pixel label
    rows that loading and augmentation carry along: outline points x y ... after the box, see augmentations.py).
    cache="ram" is dropped with one warning when the images would not fit in ram_available bytes (None: the
    system's figure, available_ram()); cache="disk" keeps its entries in disk_cache_dir, beside the label cache.
    """

    cache_suffix = ".cache"  # label cache file: <labels folder or image list><suffix>
    cache_tag = ""  # the kind of record, part of the cache key
    label_columns = 5  # columns of the label rows while loading and augmenting: cls x1 y1 x2 y2 (+ outline points)

    def __init__(self, path: Union[PathLike, list[PathLike]], img_size: int = 640, batch_size: int = 16, augment: bool = False,
                 hyp: dict | None = None, rect: bool = False, cache: str | None = None, single_cls: bool = False,
                 stride: int = 32, pad: float = 0.0, nc: int | None = None, workers: int = 8, prefix: str = "",
                 ram_available: int | None = None) -> None:
        if cache and cache not in ("ram", "disk", True):
            raise DatasetError(f"{prefix}cache must be None, 'ram' or 'disk', got {cache!r}")
        self.img_size, self.augment, self.rect, self.stride = img_size, augment, rect, stride
        self.hyp = {**DEFAULT_AUG_HYP, **(hyp or {})}
        self.mosaic = augment and not rect  # train.py may switch this off for the final epochs
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        files = collect_image_files(path, prefix)
        p0 = Path(path[0] if isinstance(path, (list, tuple)) else path)
        base = p0 if p0.is_file() else Path(img2label_paths(files)[0]).parent  # the image list, or the labels folder
        cache_path = base.with_suffix(self.cache_suffix)
        self.disk_cache_dir = base.with_suffix(".disk-cache")  # --cache disk entries (utils.data.disk_cache), any task
        records, self.stats = scan_dataset(files, cache_path, nc, workers, prefix, str(path), self.read_labels, self.cache_tag)
        records = [r for r in records if r["status"] != "corrupt"]
        if not records:
            raise DatasetError(f"{prefix}{path}: no usable images (all {len(files)} corrupt)")
        self._set_records(records, single_cls, f"{prefix}{path}")
        n = len(records)
        self.batch = np.arange(n) // batch_size
        self.batch_shapes = None
        if rect:
            order, self.batch_shapes = rect_batch_shapes(self.img_shapes, batch_size, img_size, stride, pad)
            self._reorder(order)
        self.ims: list[np.ndarray | None] = [None] * n
        self.cache = "ram" if cache is True else (cache or None)
        if self.cache == "ram" and not self._ram_cache_fits(available_ram() if ram_available is None else ram_available, prefix):
            self.cache = None
        if self.cache:
            self._cache_images(workers, prefix)

    @staticmethod
    def read_labels(lb_file: str, nc: int | None) -> tuple[dict[str, Any], str | None, str]:
        """The label fields of a cache record, note and status (a LabelReader)."""
        return read_box_labels(lb_file, nc)

    def _set_records(self, records: list[dict], single_cls: bool, where: str) -> None:
        """Take files, labels and sizes from the usable scan records (where: the dataset, for messages)."""
        self.im_files = [r["im_file"] for r in records]
        self.label_files = img2label_paths(self.im_files)
        self.labels = [np.array(r["labels"], dtype=np.float32).reshape(-1, 5) for r in records]
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.img_shapes = np.array([r["shape"] for r in records], dtype=np.float64)  # (h, w) upright originals

    def _reorder(self, order: np.ndarray) -> None:
        """Apply a new item order (aspect-ratio sort for rect batches)."""
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.img_shapes = self.img_shapes[order]

    def _decode(self, im_file: str, reduce: int = 1) -> np.ndarray:
        """Decode one image from its source file (one-line DatasetError if it cannot be read)."""
        try:
            return load_image(im_file, reduce)
        except ImageError as e:
            raise DatasetError(str(e)) from None

    def _ram_cache_fits(self, available: int | None, prefix: str) -> bool:
        """Whether every image at the training size (known from the scan, nothing decoded) plus RAM_CACHE_MARGIN fits in
        `available` bytes (None: unknown, assumed to fit); one warning line when it does not."""
        need = sum(h * w * 3 for h, w in map(self.resized_shape, range(len(self))))
        if available is None or need * (1 + RAM_CACHE_MARGIN) <= available:
            return True
        LOGGER.warning(f"{prefix}WARNING: --cache ram needs {need / 1e9:.2f} GB (+{RAM_CACHE_MARGIN:.0%} margin) for "
                       f"{len(self)} images but only {available / 1e9:.2f} GB of memory is available; not caching images")
        return False

    def _cache_images(self, workers: int, prefix: str) -> None:
        """Cache resized images in RAM, or original decoded images as keyed .npy files in the dataset's disk cache folder
        (utils.data.disk_cache)."""
        def work(i: int) -> int:
            if self.cache == "disk":
                return disk_cache.ensure_entry(self.im_files[i], self._decode, self.disk_cache_dir)
            im = self.ims[i] = self.load_image(i)[0]
            return im.nbytes

        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
            total = sum(tqdm(pool.map(work, range(len(self))), total=len(self), desc=f"{prefix}Caching images",
                             disable=len(self) < 1000))
        LOGGER.info(f"{prefix}Cached {len(self)} images ({total / 1e9:.2f} GB {self.cache})")

    def __len__(self) -> int:
        return len(self.im_files)

    def close_mosaic(self) -> None:
        """Stop using mosaic (YOLOv5's close-mosaic for the last epochs)."""
        self.mosaic = False

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """BGR image with its long side resized to img_size -> (img, (h0, w0) original, (h, w) resized)."""
        h0, w0 = (int(v) for v in self.img_shapes[i])
        cached = self.ims[i]
        if cached is not None:
            return cached, (h0, w0), (cached.shape[0], cached.shape[1])
        if self.cache == "disk":
            im = disk_cache.load_entry(self.im_files[i], self._decode, self.disk_cache_dir)
        else:  # training never upsamples a big JPEG again, so it decodes at the smallest DCT scale that stays >= img_size
            im = self._decode(self.im_files[i], jpeg_reduction(self.im_files[i], (h0, w0), self.img_size) if self.augment else 1)
        im = resize_long_side(im, self.img_size, self.augment)
        return im, (h0, w0), im.shape[:2]

    def resized_shape(self, i: int) -> tuple[int, int]:
        """(h, w) that load_image(i) returns, from the scanned size (nothing decoded; may be 1 px off after a reduced decode)."""
        h0, w0 = self.img_shapes[i]
        r = self.img_size / max(h0, w0)
        return max(1, int(round(h0 * r))), max(1, int(round(w0 * r)))

    def _rand_index(self) -> int:
        return int(np.random.randint(0, len(self)))

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Four images tiled around a random centre on a 2s canvas, warped/cropped to s -> (img, [cls x1 y1 x2 y2]).

        The canvas itself is never built whole and images that fall wholly out of view are never decoded. A pure zoom
        and shift (the default hyps) is snapped to whole canvas pixels (it moves by under one) and drawn tile by tile
        with cv2.resize; other warps build only the part of the canvas they sample and use warpAffine/warpPerspective.
        """
        s, hyp = self.img_size, self.hyp
        yc, xc = (int(np.random.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        indices = [index] + [self._rand_index() for _ in range(3)]
        warp = Warp.draw((2 * s, 2 * s), self.mosaic_border, hyp["degrees"], hyp["translate"], hyp["scale"], hyp["shear"],
                         hyp["perspective"])
        grid = warp.on_pixel_grid((2 * s, 2 * s))
        if grid is not None:
            return self._mosaic_by_tiles(indices, (xc, yc), grid[0], grid[1][:2])
        rect = warp.source_region((2 * s, 2 * s))
        region, labels = self._mosaic_region(indices, (xc, yc), rect)
        return warp.apply_image(region, origin=rect[:2]), warp.apply_labels(labels)

    def _mosaic_by_tiles(self, indices: list[int], centre: tuple[int, int], warp: Warp,
                         origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The mosaic under a zoom-and-shift warp, drawn tile by tile: each image's visible part is resized once, from
        the decoded file straight to its place in the output (no resize to img_size first, no canvas), and its labels
        follow that exact mapping."""
        s, (xc, yc), (gx, gy) = self.img_size, centre, origin
        fx, fy = warp.matrix[0, 0], warp.matrix[1, 1]  # canvas pixel -> output pixel: X = fx * (x - gx)
        out = np.full((warp.out_h, warp.out_w, 3), 114, dtype=np.uint8)
        all_labels = [np.zeros((0, self.label_columns), np.float32)]
        for k, idx in enumerate(indices):
            h, w = self.resized_shape(idx)
            x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)
            ox0, ox1 = (min(max(round(fx * (v - gx)), 0), warp.out_w) for v in (max(x1, 0), min(x1 + w, 2 * s)))
            oy0, oy1 = (min(max(round(fy * (v - gy)), 0), warp.out_h) for v in (max(y1, 0), min(y1 + h, 2 * s)))
            if ox1 <= ox0 or oy1 <= oy0:
                continue  # out of sight: never decoded, and its boxes would all be cropped away
            src = self._tile_source(idx, max(fx, fy))
            sy, sx = src.shape[0] / h, src.shape[1] / w  # source pixels per pixel of the img_size-resized tile
            px0, px1 = _source_span(ox0, ox1, fx, gx - x1, sx, src.shape[1])
            py0, py1 = _source_span(oy0, oy1, fy, gy - y1, sy, src.shape[0])
            out[oy0:oy1, ox0:ox1] = cv2.resize(src[py0:py1, px0:px1], (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_LINEAR)
            # tile pixels -> output pixels through the crop that was actually resized; the canvas edges crop the tile.
            # Columns 1, 3, 5, ... are x (the box's and any outline points'), columns 2, 4, 6, ... are y.
            lb = self._placed_labels(idx, w, h)
            lb[:, 1::2] = ox0 + (lb[:, 1::2].clip(max(-x1, 0), min(2 * s - x1, w)) * sx - px0) * (ox1 - ox0) / (px1 - px0)
            lb[:, 2::2] = oy0 + (lb[:, 2::2].clip(max(-y1, 0), min(2 * s - y1, h)) * sy - py0) * (oy1 - oy0) / (py1 - py0)
            all_labels.append(lb)
        return out, keep_visible_boxes(np.concatenate(all_labels, 0), warp.out_h, warp.out_w)

    def _tile_source(self, i: int, zoom: float) -> np.ndarray:
        """Image i as decoded (cached, or from a JPEG at the smallest DCT scale that still covers img_size x zoom)."""
        cached = self.ims[i]
        if cached is not None:
            return cached
        if self.cache == "disk":
            return disk_cache.load_entry(self.im_files[i], self._decode, self.disk_cache_dir)
        h0, w0 = (int(v) for v in self.img_shapes[i])
        return self._decode(self.im_files[i], jpeg_reduction(self.im_files[i], (h0, w0), math.ceil(self.img_size * zoom)))

    def _mosaic_region(self, indices: list[int], centre: tuple[int, int],
                       rect: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The rect (x1, y1, x2, y2) of the 2s mosaic canvas (grey beyond it) and the labels of the four images in canvas pixels."""
        s, (xc, yc), (rx1, ry1, rx2, ry2) = self.img_size, centre, rect
        region = np.full((max(ry2 - ry1, 1), max(rx2 - rx1, 1), 3), 114, dtype=np.uint8)
        vx1, vy1, vx2, vy2 = max(rx1, 0), max(ry1, 0), min(rx2, 2 * s), min(ry2, 2 * s)  # the canvas part in view
        all_labels = [np.zeros((0, self.label_columns), np.float32)]
        for k, idx in enumerate(indices):
            h, w = self.resized_shape(idx)
            x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)
            if x1 + w + 2 <= vx1 or x1 - 2 >= vx2 or y1 + h + 2 <= vy1 or y1 - 2 >= vy2:
                continue  # out of sight: its boxes would all be cropped away too
            img, _, (h, w) = self.load_image(idx)
            x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)  # exact size, if a reduced decode differed
            cx1, cy1, cx2, cy2 = max(x1, vx1), max(y1, vy1), min(x1 + w, vx2), min(y1 + h, vy2)
            if cx2 > cx1 and cy2 > cy1:
                region[cy1 - ry1:cy2 - ry1, cx1 - rx1:cx2 - rx1] = img[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
            all_labels.append(self._placed_labels(idx, w, h, x1, y1))
        labels = np.concatenate(all_labels, 0)
        labels[:, 1:] = labels[:, 1:].clip(0, 2 * s)  # boxes and any outline points: the canvas edges crop the images
        return region, labels

    def _placed_labels(self, i: int, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
        """Labels of image i as pixel rows [cls x1 y1 x2 y2] (label_columns wide) for the image drawn w x h at (padw, padh)."""
        lb = self.labels[i].copy()
        if len(lb):
            lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, padw, padh)
        return lb

    def _load_letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Letterboxed image, pixel xyxy labels and the shapes tuple used to map predictions back."""
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = tuple(self.batch_shapes[self.batch[index]]) if self.rect and self.batch_shapes is not None else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        shapes = ((h0, w0), ((h * ratio[1] / h0, w * ratio[0] / w0), pad))
        labels = self._placed_labels(index, ratio[0] * w, ratio[1] * h, pad[0], pad[1])
        if self.augment:
            hyp = self.hyp
            img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"], scale=hyp["scale"],
                                             shear=hyp["shear"], perspective=hyp["perspective"])
        return img, labels, shapes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        img, labels, shapes = self._load_item(index)
        return self._item_tensors(img, labels, index, shapes)

    def _load_item(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        """(BGR image, float32 normalised rows [cls cx cy w h (+ outline points x y ...)], shapes) after all augmentation."""
        hyp = self.hyp
        if self.augment and self.mosaic and np.random.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index)
            shapes = None
            if np.random.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(self._rand_index()))
        else:
            img, labels, shapes = self._load_letterboxed(index)
        labels = labels.reshape(-1, self.label_columns).astype(np.float32)
        h, w = img.shape[:2]
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=w, h=h, clip=True)
            labels[:, 5::2] /= w  # outline points, when rows carry them
            labels[:, 6::2] /= h
        if self.augment:
            augment_hsv(img, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            if np.random.random() < hyp["flipud"]:
                img = cv2.flip(img, 0)
                flip_labels(labels, lr=False)
            if np.random.random() < hyp["fliplr"]:
                img = cv2.flip(img, 1)
                flip_labels(labels, lr=True)
        return img, labels, shapes

    def _item_tensors(self, img: np.ndarray, labels: np.ndarray, index: int,
                      shapes: tuple | None) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        """The item: (RGB CHW uint8 view of img, (n, 6) [0, cls, cx, cy, w, h] from the first 5 label columns, path, shapes)."""
        out = torch.zeros((len(labels), 6))
        out[:, 1:] = torch.from_numpy(np.ascontiguousarray(labels[:, :5]))
        rgb = torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))  # HWC: the CHW view below is channels-last in memory
        return rgb.permute(2, 0, 1), out, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]:
        """Stack images into one channels-last uint8 batch and concatenate labels, writing each one's image index into column 0."""
        imgs, labels, paths, shapes = zip(*batch)
        targets = torch.cat(labels, 0)
        targets[:, 0] = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(lb) for lb in labels], dtype=torch.long))
        return stack_channels_last(imgs), targets, paths, shapes


def stack_channels_last(imgs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) images -> one (B, C, H, W) batch laid out channels-last, the layout the model trains fastest in
    (one copy per image, none for the images the dataset already hands over as HWC views)."""
    c, h, w = imgs[0].shape
    out = torch.empty((len(imgs), h, w, c), dtype=imgs[0].dtype)
    for i, im in enumerate(imgs):
        out[i].copy_(im.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def _source_span(o0: int, o1: int, f: float, shift: float, scale: float, size: int) -> tuple[int, int]:
    """Whole source pixels [p0, p1) that output pixels [o0, o1) show on one axis, where output = f * (tile - shift) and
    source = tile * scale; rounding to whole pixels is why labels are mapped through the span actually resized."""
    p0 = min(max(round((o0 / f + shift) * scale), 0), size - 1)
    p1 = min(max(round((o1 / f + shift) * scale), p0 + 1), size)
    return p0, p1


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each loader worker from torch's per-worker seed (distinct, reproducible augmentation).

    OpenCV's thread count is left alone: cv2.setNumThreads in a forked worker hangs once the parent has used OpenCV's
    thread pool (tests/test_training_flags.py caught it).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def restarted(loader: DataLoader) -> DataLoader:
    """The same loader (dataset, sampler, batching) with fresh workers, which see changes made to the dataset since
    (close_mosaic): persistent workers keep the copy they started with."""
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, persistent_workers=loader.persistent_workers)


def create_dataloader(path: Union[PathLike, list[PathLike]], imgsz: int, batch_size: int, stride: int, single_cls: bool = False,
                      hyp: dict | None = None, augment: bool = False, cache: str | None = None, pad: float = 0.0, rect: bool = False,
                      workers: int = 8, shuffle: bool = False, prefix: str = "", nc: int | None = None, seed: int = 0,
                      rank: int = -1, quad: bool = False, image_weights: bool = False,
                      dataset_cls: type[LoadImagesAndLabels] = LoadImagesAndLabels,
                      dataset_kwargs: dict[str, Any] | None = None) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Build the dataset and a seeded DataLoader over it (DistributedSampler when rank != -1).

    quad: YOLOv5's four-image collate (utils.data.quad). image_weights: an EpochWeightedSampler whose weights the
    trainer sets each epoch (single process only). dataset_cls (a LoadImagesAndLabels subclass, built with
    dataset_kwargs on top of the arguments here) and its collate_fn make other loaders (utils.data.seg_dataset).
    """
    from utils.data.image_weights import EpochWeightedSampler
    from utils.data.quad import collate_quad

    if image_weights and rank != -1:
        raise DatasetError(f"{prefix}image_weights sampling is not supported with DDP (rank {rank})")
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING: rect=True is incompatible with shuffle, setting shuffle=False")
        shuffle = False
    dataset = dataset_cls(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, cache=cache, single_cls=single_cls,
                          stride=int(stride), pad=pad, nc=nc, workers=workers, prefix=prefix, **(dataset_kwargs or {}))
    batch_size = min(batch_size, len(dataset))
    nw = max(0, min(os.cpu_count() or 1, batch_size if batch_size > 1 else 0, workers))
    sampler: DistributedSampler | EpochWeightedSampler | None = None
    if image_weights:
        sampler = EpochWeightedSampler(len(dataset), seed)
    elif rank != -1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw, sampler=sampler,
                        pin_memory=torch.cuda.is_available(), collate_fn=collate_quad if quad else dataset_cls.collate_fn,
                        worker_init_fn=seed_worker, generator=generator, persistent_workers=nw > 0)
    return loader, dataset
