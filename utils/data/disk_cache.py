"""`--cache disk`: each decoded image kept as `<cache folder>/<key>.<size>-<mtime_ns>.npy`, where the key is a hash of the
image's resolved path.

The cache folder is the dataset's own (LoadImagesAndLabels puts it beside its label cache: `labels/train.disk-cache/`
for a `labels/train/` folder, `train.disk-cache/` beside a `train.txt` image list), so no file is ever written beside
a user's images, even when an image list points outside the dataset. The name is the key: editing the image (new size
or modification time) changes the name, so a stale entry is never read, and writing the new entry deletes that image's
older ones. Entries are written atomically (temp file + rename), and an entry that is damaged (truncated, wrong dtype or
shape) is rebuilt from the image with one warning.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np

from utils.files import atomic_write, first_line

LOGGER = logging.getLogger("mobile_yolo")
Decoder = Callable[[str], np.ndarray]
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def image_key(im_file: str) -> str:
    """The part of an image's entry names that says which image it is: a hash of its resolved path."""
    return hashlib.sha256(str(Path(im_file).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def entry_path(im_file: str, folder: Path) -> Path:
    """The image's entry in the cache folder, keyed on its current size and modification time (OSError if it is gone)."""
    st = Path(im_file).stat()
    return Path(folder) / f"{image_key(im_file)}.{st.st_size}-{st.st_mtime_ns}.npy"


def entry_problem(f: Path) -> str | None:
    """Why an entry cannot be used, from its header and length alone (no pixels read), or None when it is whole."""
    try:
        with open(f, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in _HEADER_READERS:
                return f"unsupported .npy format version {version}"
            shape, fortran, dtype = _HEADER_READERS[version](fh)
            expected = fh.tell() + int(np.prod(shape)) * dtype.itemsize
        size = f.stat().st_size
    except (OSError, ValueError, EOFError) as e:
        return first_line(e)
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3 or fortran:
        return f"holds {dtype} {shape}, expected uint8 HxWx3"
    return None if size == expected else f"{size} bytes, expected {expected} (truncated?)"


def write_entry(im_file: str, f: Path, im: np.ndarray) -> None:
    """Store `im` as entry f atomically, then delete the image's stale entries; a failed write only warns."""
    try:
        with atomic_write(f) as fh:
            np.save(fh, im, allow_pickle=False)
    except OSError as e:
        LOGGER.warning(f"WARNING: {f}: cannot write disk cache entry ({e.strerror or e}), using the decoded image")
        return
    key = image_key(im_file)
    stale = re.compile(re.escape(key) + r"\.\d+-\d+\.npy")
    for old in f.parent.glob(key + ".*.npy"):
        if old != f and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)


def _rebuild(im_file: str, f: Path, decode: Decoder, problem: str | None) -> np.ndarray:
    """Decode the image and (re)write its entry, warning once when an existing entry was unusable."""
    if problem is not None:
        LOGGER.warning(f"WARNING: {f}: unusable disk cache entry ({problem}), rebuilding it from {im_file}")
    im = decode(im_file)
    write_entry(im_file, f, im)
    return im


def ensure_entry(im_file: str, decode: Decoder, folder: Path) -> int:
    """Make sure a whole entry exists for the image in the cache folder (checked by header only); returns its size in bytes."""
    f = entry_path(im_file, folder)
    if not f.is_file():
        return _rebuild(im_file, f, decode, None).nbytes
    problem = entry_problem(f)
    if problem is not None:
        return _rebuild(im_file, f, decode, problem).nbytes
    return f.stat().st_size


def load_entry(im_file: str, decode: Decoder, folder: Path) -> np.ndarray:
    """The cached image from the cache folder, building a missing entry and rebuilding a damaged one from the image."""
    f = entry_path(im_file, folder)
    if not f.is_file():
        return _rebuild(im_file, f, decode, None)
    problem = entry_problem(f)
    if problem is None:
        try:
            return np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            problem = first_line(e)
    return _rebuild(im_file, f, decode, problem)
