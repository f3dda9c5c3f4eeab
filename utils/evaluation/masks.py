"""Instance-mask helpers for segmentation evaluation: mask IoU and COCO compressed RLE.

COCO RLE: the mask is read column by column (Fortran order) into run lengths that alternate 0-runs and 1-runs, starting
with a (possibly empty) 0-run. The compact string stores each run (from the fourth on, as the difference from the run
two before) in little-endian 5-bit groups; each group's sixth bit says that more groups follow, and 48 is added to make
it a printable character.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

RLE = dict[str, Union[list[int], str, bytes]]  # {"size": [h, w], "counts": ...}


def mask_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(n, m) IoU between n and m flattened binary masks, (n, HW) and (m, HW) of any numeric or bool dtype."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / (union + eps)


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a binary (h, w) mask, starting with the 0-run (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    if not flat.size:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _runs_to_string(runs: list[int]) -> str:
    """COCO's compact string form of RLE run lengths."""
    out: list[str] = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in all-ones groups
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
    return "".join(out)


def _string_to_runs(counts: str) -> list[int]:
    """Inverse of _runs_to_string."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        x, shift, more = 0, 0, True
        while more:
            c = ord(counts[pos]) - 48
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                x -= 1 << shift  # sign-extend
        runs.append(x + runs[-2] if len(runs) > 2 else x)
    return runs


def encode_rle(mask: np.ndarray) -> RLE:
    """COCO compressed RLE {"size": [h, w], "counts": str} of a binary (h, w) mask (what pycocotools.mask.encode writes)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle: expected an (h, w) mask, got shape {mask.shape}")
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": _runs_to_string(_runs(mask))}


def decode_rle(rle: RLE) -> np.ndarray:
    """The (h, w) uint8 mask of a COCO RLE, compressed (str or bytes counts) or uncompressed (list counts)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode()
    runs = [int(c) for c in counts] if isinstance(counts, list) else _string_to_runs(counts)
    if sum(runs) != h * w:
        raise ValueError(f"decode_rle: runs cover {sum(runs)} pixels, size {h}x{w} has {h * w}")
    values = np.arange(len(runs)) % 2
    return np.repeat(values, runs).astype(np.uint8).reshape((h, w), order="F")
