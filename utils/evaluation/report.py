"""Validation figures drawn from evaluation data: PR/F1/P/R curves, the confusion matrix and the val_batch mosaics.

The metrics hand back data only; this module is the one place in utils/evaluation/ that draws (through utils.plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.evaluation.evaluator import DetectionResult
from utils.evaluation.metrics import Curves
from utils.plots import plot_confusion_matrix, plot_images, plot_mc_curve, plot_pr_curve

PathLike = Union[str, Path]


def _class_names(names: Sequence[str], classes: Sequence[int]) -> list[str]:
    """Name of each class index, its number where names has no entry."""
    return [names[c] if 0 <= c < len(names) else str(c) for c in classes]


def plot_curves(curves: Curves, names: Sequence[str], save_dir: PathLike, prefix: str = "") -> list[Path]:
    """Write {prefix}PR_curve.png, F1_curve.png, P_curve.png and R_curve.png for the classes present in the labels."""
    save_dir = Path(save_dir)
    present = _class_names(names, curves.classes.tolist())
    return [
        plot_pr_curve(curves.px, curves.pr, curves.ap, save_dir / f"{prefix}PR_curve.png", present),
        plot_mc_curve(curves.px, curves.f1, save_dir / f"{prefix}F1_curve.png", present, ylabel="F1"),
        plot_mc_curve(curves.px, curves.p, save_dir / f"{prefix}P_curve.png", present, ylabel="Precision"),
        plot_mc_curve(curves.px, curves.r, save_dir / f"{prefix}R_curve.png", present, ylabel="Recall"),
    ]


def plot_confusion(matrix: np.ndarray, names: Sequence[str], save_dir: PathLike, prefix: str = "", normalize: bool = True) -> Path:
    """Write {prefix}confusion_matrix.png from (nc+1, nc+1) counts."""
    nc = matrix.shape[0] - 1
    return plot_confusion_matrix(matrix, _class_names(names, range(nc)), Path(save_dir) / f"{prefix}confusion_matrix.png", normalize)


def plot_result(result: DetectionResult, save_dir: PathLike, prefix: str = "") -> list[Path]:
    """All end-of-validation figures of a result: the curves (when some detection was correct) and the confusion matrix."""
    files = plot_curves(result.curves, result.names, save_dir, prefix) if result.curves is not None else []
    return [*files, plot_confusion(result.confusion, result.names, save_dir, prefix)]


def plot_val_batch(
    images: torch.Tensor, targets: torch.Tensor, detections: Sequence[torch.Tensor], paths: Sequence[str], names: Sequence[str],
    save_dir: PathLike, index: int, max_det: int = 300,
) -> tuple[Path, Path]:
    """val_batch{index}_labels.jpg from (k, 6) [image, cls, cx, cy, w, h] pixel targets, val_batch{index}_pred.jpg from detections."""
    save_dir = Path(save_dir)
    labels_file, pred_file = save_dir / f"val_batch{index}_labels.jpg", save_dir / f"val_batch{index}_pred.jpg"
    plot_images(images, targets.detach().cpu(), paths, labels_file, names)
    rows = []
    for si, det in enumerate(detections):
        det = det[:max_det, :6].detach().float().cpu()
        rows.append(torch.cat((torch.full((len(det), 1), float(si)), det[:, 5:6], xyxy2xywh(det[:, :4]), det[:, 4:5]), 1))
    plot_images(images, torch.cat(rows, 0) if rows else torch.zeros(0, 7), paths, pred_file, names)
    return labels_file, pred_file
