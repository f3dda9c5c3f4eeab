"""--image-weights: per-image sampling weights from class frequency and per-class mAP, and the sampler that draws them.

The maths (YOLOv5's meaning):
- class weights = inverse label count per class, normalised to sum 1 (classes without labels get 0: no image holds them);
- each epoch, cw = class_weights * (1 - maps) ** 2 / nc, maps being the per-class mAP50-95 of the last validation
  (zeros before any), so rare and poorly detected classes weigh more;
- image weight = sum of cw over the image's labels (a class counted once per label).
Divergence from YOLOv5: an image without labels (a background) gets the smallest weight of a labelled image instead
of 0, so backgrounds keep being drawn (rarely) rather than silently leaving the training set; when every weight is 0
(e.g. maps all 1) the draw falls back to uniform instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _classes_per_label(labels: Sequence[np.ndarray], nc: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, class) of every label whose class lies in [0, nc)."""
    counts = [len(lb) for lb in labels]
    cls = np.concatenate([np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 0] for lb in labels]) if labels else np.zeros(0)
    img = np.repeat(np.arange(len(labels)), counts)
    cls = cls.astype(np.int64)
    keep = (cls >= 0) & (cls < nc)
    return img[keep], cls[keep]


def class_weights(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """(nc,) inverse label frequency per class, summing to 1 (0 for classes without labels; all 0 when none has any)."""
    _, cls = _classes_per_label(labels, nc)
    counts = np.bincount(cls, minlength=nc).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros(nc), where=counts > 0)
    total = weights.sum()
    return weights / total if total > 0 else weights


def epoch_class_weights(base: np.ndarray, maps: np.ndarray | None, nc: int) -> np.ndarray:
    """(nc,) this epoch's class weights: base * (1 - mAP50-95 per class) ** 2 / nc (maps None: no validation yet)."""
    maps = np.zeros(nc) if maps is None else np.clip(np.asarray(maps, dtype=np.float64), 0.0, 1.0)
    if maps.shape != (nc,):
        raise ValueError(f"per-class mAP has shape {maps.shape}, expected ({nc},)")
    return np.asarray(base, dtype=np.float64) * (1.0 - maps) ** 2 / nc


def image_weights(labels: Sequence[np.ndarray], cw: np.ndarray) -> np.ndarray:
    """(n,) sum of class weights over each image's labels; backgrounds get the smallest labelled-image weight."""
    img, cls = _classes_per_label(labels, len(cw))
    weights = np.bincount(img, weights=np.asarray(cw, dtype=np.float64)[cls], minlength=len(labels))
    labelled = np.bincount(img, minlength=len(labels)) > 0
    positive = weights[labelled & (weights > 0)]
    weights[~labelled] = positive.min() if len(positive) else 0.0
    return weights


def epoch_image_weights(labels: Sequence[np.ndarray], nc: int, maps: np.ndarray | None = None) -> np.ndarray:
    """(n,) the image weights of one epoch, from the training labels and the last per-class mAP50-95."""
    return image_weights(labels, epoch_class_weights(class_weights(labels, nc), maps, nc))


class EpochWeightedSampler(Sampler[int]):
    """Draws len(dataset) indices with replacement by weights the trainer replaces each epoch; seeded by seed + epoch.

    It draws in the main process (the DataLoader asks the sampler, then sends indices to workers), so new weights take
    effect with any number of workers; the same seed, epoch and weights give the same indices.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"weighted sampler needs at least one image, got {n}")
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = np.ones(n) / n

    def set_weights(self, weights: np.ndarray) -> None:
        """Use these (n,) non-negative weights from now on (all zero: uniform)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n,) or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"image weights must be {self.n} finite non-negative numbers, got shape {w.shape}")
        total = w.sum()
        self.weights = w / total if total > 0 else np.ones(self.n) / self.n

    def set_epoch(self, epoch: int) -> None:
        """Reseed the next draw (the trainer calls this at the start of each epoch)."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """The epoch's draw: n indices sampled with replacement by weight."""
        rng = np.random.default_rng([self.seed % 2**32, self.epoch])
        return rng.choice(self.n, size=self.n, replace=True, p=self.weights)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.n

