"""AutoAnchor: check how well the model's anchors fit the dataset's boxes and re-fit them by k-means + evolution."""

from __future__ import annotations

import logging
from typing import cast

import numpy as np
import torch
from torch import nn

from models.heads.detect import Detect
from utils.checkpoint import unwrap_model

LOGGER = logging.getLogger("mobile_yolo")
BPR_GOOD = 0.98  # best possible recall above which the anchors are kept as they are


def label_wh_from_dataset(
    shapes: np.ndarray, labels: list[np.ndarray], imgsz: int, jitter: tuple[float, float] = (0.9, 1.1), seed: int = 0
) -> np.ndarray:
    """Label (w, h) in pixels once each image is letterboxed to imgsz, times a random scale in `jitter` (augmentation-like)."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    if len(shapes) != len(labels):
        raise ValueError(f"label_wh_from_dataset: {len(shapes)} image shapes but {len(labels)} label arrays")
    sized = imgsz * shapes / shapes.max(1, keepdims=True)
    parts = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(sized, labels)]
    wh = np.concatenate(parts, 0) if parts else np.zeros((0, 2))
    scale = np.random.default_rng(seed).uniform(jitter[0], jitter[1], size=(len(wh), 1))
    return (wh * scale).astype(np.float32)


def _ratio_metric(anchors: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """(n, k) symmetric size match in (0, 1]: the worse of the w and h ratios of each box to each anchor."""
    r = wh[:, None] / anchors[None]
    return np.minimum(r, 1 / r).min(2)


def anchor_metrics(anchors: np.ndarray, wh: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """Best possible recall (share of boxes with some anchor within ratio thr) and mean anchors above threshold per box."""
    if len(wh) == 0:
        return 0.0, 0.0
    x = _ratio_metric(np.asarray(anchors, dtype=np.float64), np.asarray(wh, dtype=np.float64))
    bpr = float((x.max(1) > 1 / thr).mean())
    aat = float((x > 1 / thr).sum(1).mean())
    return bpr, aat


def _fitness(anchors: np.ndarray, wh: np.ndarray, thr: float) -> float:
    """Mean over boxes of the best anchor match, counting only matches above 1/thr."""
    best = _ratio_metric(anchors, wh).max(1)
    return float((best * (best > 1 / thr)).mean())


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding (numpy only, so scipy is not needed)."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    c = np.asarray(centres, dtype=np.float64)
    for _ in range(iters):
        assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c


def _evolve(k: np.ndarray, wh: np.ndarray, thr: float, gen: int, rng: np.random.Generator) -> np.ndarray:
    """Random multiplicative mutation of the anchors, keeping a mutation only when it raises the fitness."""
    best_f, mp, sigma = _fitness(k, wh, thr), 0.9, 0.1
    for _ in range(gen):
        v = np.ones_like(k)
        while np.all(v == 1):  # make sure something changes
            mask = rng.random(k.shape) < mp
            v = (mask * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        cand = (k * v).clip(min=2.0)
        f = _fitness(cand, wh, thr)
        if f > best_f:
            best_f, k = f, cand
    return k


def kmean_anchors(wh: np.ndarray, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000, verbose: bool = False,
                  seed: int = 0) -> np.ndarray:
    """n anchors (pixels at img_size, area ascending) fitted to label wh by whitened k-means then evolution."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    tiny = int((wh < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"AutoAnchor: {tiny} of {len(wh)} labels are smaller than 3 pixels at {img_size}; those under 2 pixels are ignored")
    wh = wh[(wh >= 2.0).all(1)]
    if len(wh) < n:
        raise ValueError(f"kmean_anchors: need at least {n} labels of 2+ pixels to fit {n} anchors, got {len(wh)}")
    rng = np.random.default_rng(seed)
    s = wh.std(0)
    s[s == 0] = 1.0
    k = _kmeans(wh / s, n, rng) * s
    k = k[np.argsort(k.prod(1))]
    if verbose:
        _log_anchors("k-means", k, wh, thr)
    k = _evolve(k, wh, thr, gen, rng)
    k = k[np.argsort(k.prod(1))]
    if verbose:
        _log_anchors("evolved", k, wh, thr)
    return k.astype(np.float32)


def _log_anchors(stage: str, k: np.ndarray, wh: np.ndarray, thr: float) -> None:
    """One summary line for a set of anchors."""
    bpr, aat = anchor_metrics(k, wh, thr)
    sizes = ", ".join(f"{w:.0f},{h:.0f}" for w, h in np.round(k))
    LOGGER.info(f"AutoAnchor {stage}: fitness {_fitness(k, wh, thr):.4f}, BPR {bpr:.4f}, {aat:.2f} anchors/target; anchors {sizes}")


def _level_order(anchors: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """(nl, na, 2) anchors with levels flipped if their mean area order disagrees with the stride order."""
    area = anchors.prod(-1).mean(-1)
    if len(area) > 1 and (area[-1] - area[0]).sign() != (stride[-1] - stride[0]).sign():
        return anchors.flip(0)
    return anchors


def check_anchors(dataset_wh: np.ndarray, model: nn.Module, thr: float = 4.0, imgsz: int = 640) -> bool:
    """Log the anchor fit; re-fit when BPR < 0.98 and install the new anchors if they fit better. Returns True if changed."""
    det = cast(Detect, unwrap_model(model).detect)  # model is a DetectionModel, maybe DDP-wrapped; nn.Module.__getattr__ is untyped
    stride = det.stride.detach().cpu().float()
    current = (det.anchors.detach().cpu().float() * stride.view(-1, 1, 1)).view(-1, 2).numpy()
    wh = np.asarray(dataset_wh, dtype=np.float64).reshape(-1, 2)
    bpr, aat = anchor_metrics(current, wh, thr)
    LOGGER.info(f"AutoAnchor: {aat:.2f} anchors/target, best possible recall {bpr:.3f}")
    if bpr >= BPR_GOOD:
        LOGGER.info("AutoAnchor: current anchors are a good fit to the dataset")
        return False
    LOGGER.info(f"AutoAnchor: BPR below {BPR_GOOD}, fitting new anchors")
    try:
        new = kmean_anchors(wh, n=det.nl * det.na, img_size=imgsz, thr=thr, gen=1000)
    except ValueError as e:
        LOGGER.warning(f"AutoAnchor: {e}; keeping the original anchors")
        return False
    new_bpr, _ = anchor_metrics(new, wh, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"AutoAnchor: fitted anchors are no better (BPR {new_bpr:.3f}); keeping the original anchors")
        return False
    levels = _level_order(torch.from_numpy(new).float().view(det.nl, det.na, 2), stride)
    with torch.no_grad():
        det.anchors.copy_((levels / stride.view(-1, 1, 1)).to(det.anchors))
    LOGGER.info(f"AutoAnchor: new anchors installed (BPR {bpr:.3f} -> {new_bpr:.3f}); update the model yaml to reuse them")
    return True
