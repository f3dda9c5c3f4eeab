"""Training/validation plots (Agg canvas only, default fonts) and cv2 box drawing for detect and batch mosaics."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import cv2
import numpy as np
import torch

from utils.boxes import xywh2xyxy
from utils.curves import smooth

LOGGER = logging.getLogger("mobile_yolo")

Names = Union[Sequence[str], Mapping[int, str]]


def names_dict(names: Names | None) -> dict[int, str]:
    """Normalise a list/tuple/dict of class names to {index: name}."""
    if not names:
        return {}
    return dict(names) if isinstance(names, Mapping) else dict(enumerate(names))


# Twenty well-separated colours (RGB hex); class i uses entry i % 20.
_HEX = (
    "E6194B", "3CB44B", "FFE119", "4363D8", "F58231", "911EB4", "46F0F0", "F032E6", "BCF60C", "FABEBE",
    "008080", "E6BEFF", "9A6324", "FFFAC8", "800000", "AAFFC3", "808000", "FFD8B1", "000075", "808080",
)
PALETTE_RGB = tuple(tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in _HEX)


def class_color(i: int, bgr: bool = True) -> tuple[int, int, int]:
    """Fixed colour for class i, BGR for cv2 by default."""
    r, g, b = PALETTE_RGB[int(i) % len(PALETTE_RGB)]
    return (b, g, r) if bgr else (r, g, b)


def _figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (9, 6)):
    """A pyplot-free figure bound to an Agg canvas, so nothing touches the global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, save_path: Path | str, dpi: int = 200) -> Path:
    """Write the figure, creating the parent directory."""
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=dpi)
    return save_path


def _to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_pr_curve(px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: Path | str, names: Sequence[str] = ()) -> Path:
    """Precision-recall curve per class (legend when under 21 classes) and the class mean, with mAP@0.5."""
    py = np.asarray(py).reshape(-1, len(px))
    ap = np.asarray(ap).reshape(len(py), -1) if len(py) else np.zeros((0, 1))
    fig, axes = _figure()
    ax = axes[0, 0]
    per_class_legend = 0 < len(names) < 21
    for i, y in enumerate(py):
        label = f"{names[i]} {ap[i, 0]:.3f}" if per_class_legend and i < len(names) else None
        ax.plot(px, y, linewidth=1, label=label, color=None if per_class_legend else "grey")
    if len(py):
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall Curve")
    return _save(fig, save_path)


def plot_mc_curve(
    px: np.ndarray, py: np.ndarray, save_path: Path | str, names: Sequence[str] = (), xlabel: str = "Confidence", ylabel: str = "Metric"
) -> Path:
    """A metric (F1, P or R) against confidence per class, plus the smoothed class mean and its peak."""
    py = np.asarray(py).reshape(-1, len(px))
    fig, axes = _figure()
    ax = axes[0, 0]
    per_class_legend = 0 < len(names) < 21
    for i, y in enumerate(py):
        label = names[i] if per_class_legend and i < len(names) else None
        ax.plot(px, y, linewidth=1, label=label, color=None if per_class_legend else "grey")
    if len(py):
        y = smooth(py.mean(0), 0.05)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-Confidence Curve")
    return _save(fig, save_path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], save_path: Path | str, normalize: bool = True) -> Path:
    """Heat map of an (nc+1, nc+1) confusion matrix, columns normalised to sum 1 when requested."""
    matrix = np.asarray(matrix, dtype=np.float64)
    nc = matrix.shape[0] - 1
    array = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix.copy()
    array[array < 0.005] = np.nan  # leave near-empty cells blank
    fig, axes = _figure(figsize=(12, 9))
    ax = axes[0, 0]
    im = ax.imshow(array, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax)
    if nc < 30:
        labels = list(names) + ["background"] if len(names) == nc else [str(i) for i in range(nc)] + ["background"]
        ax.set_xticks(range(nc + 1), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(nc + 1), labels, fontsize=8)
        for (i, j), v in np.ndenumerate(array):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix")
    return _save(fig, save_path, dpi=150)


def plot_labels(labels: np.ndarray, names: Names = (), save_path: Path | str = "labels.jpg") -> Path:
    """Dataset label statistics: instances per class, box outlines, centre and size distributions."""
    labels = _to_numpy(labels).reshape(-1, 5)
    cls, boxes = labels[:, 0].astype(int), labels[:, 1:]
    lookup = names_dict(names)
    nc = max(len(lookup), int(cls.max()) + 1 if cls.size else 0)
    fig, axes = _figure(2, 2, figsize=(8, 8))
    counts = np.bincount(cls, minlength=nc)
    ax = axes[0, 0]
    ax.bar(range(nc), counts, color=[np.array(class_color(i, bgr=False)) / 255 for i in range(nc)])
    ax.set(ylabel="instances", title=f"{len(cls)} labels")
    if 0 < nc < 30:
        ax.set_xticks(range(nc), [lookup.get(i, str(i)) for i in range(nc)], rotation=90, fontsize=8)
    canvas = np.full((1000, 1000, 3), 255, dtype=np.uint8)
    for c, (w, h) in zip(cls[:1000], boxes[:1000, 2:4]):
        x1, y1, x2, y2 = (np.array([500 - w * 500, 500 - h * 500, 500 + w * 500, 500 + h * 500])).round().astype(int)
        cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), class_color(c, bgr=False), 1)
    axes[0, 1].imshow(canvas)
    axes[0, 1].axis("off")
    axes[1, 0].hist2d(boxes[:, 0], boxes[:, 1], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
    axes[1, 0].set(xlabel="x", ylabel="y")
    axes[1, 1].hist2d(boxes[:, 2], boxes[:, 3], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
    axes[1, 1].set(xlabel="width", ylabel="height")
    return _save(fig, save_path, dpi=150)


def result_panels(columns: Sequence[str]) -> list[str]:
    """results.png panels in YOLOv5's order: train losses, the first half of the metrics (P, R) / val losses, the second
    half (mAP50, mAP50-95), whatever the head's losses and the task's metrics are."""
    train = [c for c in columns if c.startswith("train/")]
    val = [c for c in columns if c.startswith("val/")]
    metrics = [c for c in columns if c.startswith("metrics/")]
    half = (len(metrics) + 1) // 2
    return [*train, *metrics[:half], *val, *metrics[half:]]


def plot_results(csv_path: Path | str) -> Path:
    """Plot the YOLOv5-style results.csv columns against epoch into results.png beside the file."""
    import pandas as pd

    csv_path = Path(csv_path)
    try:
        data = pd.read_csv(csv_path, skipinitialspace=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{csv_path}: cannot read results csv ({type(e).__name__}: {e})") from None
    data.columns = [str(c).strip() for c in data.columns]
    if "epoch" not in data.columns or data.empty:
        raise ValueError(f"{csv_path}: results csv has no 'epoch' column or no rows")
    x = data["epoch"].to_numpy()
    panels = result_panels(list(data.columns))
    fig, axes = _figure(2, len(panels) // 2, figsize=(12, 6))
    for ax, col in zip(axes.ravel(), panels):
        ax.set_title(col, fontsize=10)
        if col not in data.columns:
            continue
        y = data[col].to_numpy(dtype=np.float64)
        ax.plot(x, y, marker=".", linewidth=2, markersize=8, label="results")
        if y.size > 1:
            ax.plot(x, smooth(y, 0.05), ":", linewidth=2, label="smooth")
    axes[0, 0].legend()
    return _save(fig, csv_path.with_name("results.png"))


def _label_box(im: np.ndarray, x1: int, y1: int, text: str, color: tuple[int, int, int], lw: int) -> None:
    """Filled label tag above (or inside, at the top edge) a box corner."""
    font_scale, thickness = lw / 3, max(lw - 1, 1)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    outside = y1 - th - 3 >= 0
    y_top = y1 - th - 3 if outside else y1
    cv2.rectangle(im, (x1, y_top), (x1 + tw, y_top + th + 3), color, -1, cv2.LINE_AA)
    dark = 0.299 * color[2] + 0.587 * color[1] + 0.114 * color[0] < 140  # luminance of the BGR fill
    cv2.putText(im, text, (x1, y_top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                (255, 255, 255) if dark else (0, 0, 0), thickness, cv2.LINE_AA)


def draw_detections(
    im: np.ndarray, det, names: Names = (), line_width: int | None = None, hide_labels: bool = False, hide_conf: bool = False,
    ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Copy of a BGR image with (n, 6) pixel xyxy/conf/cls detections drawn as boxes labelled 'name 0.87', or, given one
    track id per row, 'id:3 name 0.87' (YOLOv8's tracking labels)."""
    out = np.ascontiguousarray(im).copy()
    det = _to_numpy(det).reshape(-1, 6)
    if ids is not None and len(ids) != len(det):
        raise ValueError(f"draw_detections: {len(ids)} track ids for {len(det)} detections")
    lw = line_width or max(round(sum(out.shape[:2]) / 2 * 0.003), 2)
    lookup = names_dict(names)
    for i, (x1, y1, x2, y2, conf, c) in enumerate(det):
        color = class_color(int(c))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, color, lw, cv2.LINE_AA)
        if not hide_labels:
            name = lookup.get(int(c), str(int(c)))
            if ids is not None:
                name = f"id:{int(ids[i])} {name}"
            _label_box(out, p1[0], p1[1], name if hide_conf else f"{name} {conf:.2f}", color, lw)
    return out


def draw_masks(im: np.ndarray, masks: np.ndarray, classes: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """Copy of a BGR image with (n, h, w) boolean instance masks blended in their class colours (translucent)."""
    out = np.ascontiguousarray(im).copy()
    for mask, c in zip(masks, classes):
        region = mask.astype(bool)
        if region.shape != out.shape[:2]:
            raise ValueError(f"draw_masks: mask shape {region.shape} does not match the image {out.shape[:2]}")
        colour = np.array(class_color(int(c)), dtype=np.float32)
        out[region] = (out[region].astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    return out


def _images_uint8(images) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] or uint8 tensor/array -> (B, H, W, 3) uint8."""
    arr = _to_numpy(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"plot_images: expected a (B, 3, H, W) batch, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (arr * 255 if arr.max(initial=0) <= 1.0 else arr).clip(0, 255).astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


def plot_images(images, targets=None, paths: Sequence[str] | None = None, fname: Path | str = "images.jpg",
                names: Names | None = None, max_size: int = 1920, max_subplots: int = 16) -> np.ndarray:
    """Mosaic of an RGB batch with its [batch_idx, cls, cx, cy, w, h(, conf)] boxes drawn, saved to fname; returns it (RGB)."""
    mosaic, ns, scale, (th, tw) = _mosaic(_images_uint8(images)[:max_subplots], max_size)
    bs = min(len(images), max_subplots)
    lw, lookup = max(round(max(th, tw) / 200), 1), names_dict(names)
    t = np.zeros((0, 6)) if targets is None else _to_numpy(targets)
    t = t.reshape(-1, t.shape[-1] if t.ndim == 2 else 6)
    for i in range(bs):
        y0, x0 = (i // ns) * th, (i % ns) * tw
        cv2.rectangle(mosaic, (x0, y0), (x0 + tw - 1, y0 + th - 1), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            cv2.putText(mosaic, Path(paths[i]).name[:40], (x0 + 5, y0 + 5 + 10 * lw), cv2.FONT_HERSHEY_SIMPLEX,
                        lw / 3, (220, 220, 220), max(lw - 1, 1), cv2.LINE_AA)
        ti = t[t[:, 0] == i]
        if not len(ti):
            continue
        boxes = xywh2xyxy(ti[:, 2:6].astype(np.float64))
        boxes *= (np.array([tw, th, tw, th]) if boxes.max() <= 1.01 else scale)  # normalised or pixel labels
        boxes += np.array([x0, y0, x0, y0])
        has_conf = ti.shape[1] > 6
        for box, row in zip(boxes, ti):
            if has_conf and row[6] <= 0.25:
                continue
            c, color = int(row[1]), class_color(int(row[1]))
            cv2.rectangle(mosaic, tuple(int(v) for v in box[:2]), tuple(int(v) for v in box[2:]), color, lw, cv2.LINE_AA)
            text = lookup.get(c, str(c)) + (f" {row[6]:.1f}" if has_conf else "")
            _label_box(mosaic, int(box[0]), int(box[1]), text, color, lw)
    return _write_mosaic(mosaic, fname)


def _mosaic(imgs: np.ndarray, max_size: int) -> tuple[np.ndarray, int, float, tuple[int, int]]:
    """(B, H, W, 3) RGB uint8 -> (square-grid BGR mosaic on white, tiles per side, tile scale, tile (h, w))."""
    bs, h, w, _ = imgs.shape
    ns = math.ceil(bs ** 0.5)
    scale = min(1.0, max_size / (ns * max(h, w)))
    th, tw = math.ceil(h * scale), math.ceil(w * scale)
    mosaic = np.full((ns * th, ns * tw, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        y0, x0 = (i // ns) * th, (i % ns) * tw
        mosaic[y0:y0 + th, x0:x0 + tw] = cv2.resize(im, (tw, th)) if scale < 1 else im
    return np.ascontiguousarray(mosaic[..., ::-1]), ns, scale, (th, tw)


def _write_mosaic(mosaic: np.ndarray, fname: Path | str) -> np.ndarray:
    """Save a BGR mosaic (creating the folder); returns it as RGB."""
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), mosaic):
        raise ValueError(f"{fname}: could not write image (unsupported extension or unwritable path)")
    return mosaic[..., ::-1].copy()


def plot_classified(images, labels, names: Names | None = None, fname: Path | str = "images.jpg", scores=None,
                    max_size: int = 1920, max_subplots: int = 25) -> np.ndarray:
    """Mosaic of an RGB batch, each tile titled with its class (and, given (B, nc) scores, the top prediction and its score)."""
    imgs = _images_uint8(images)[:max_subplots]
    mosaic, ns, _, (th, tw) = _mosaic(imgs, max_size)
    lookup, labels = names_dict(names), _to_numpy(labels).reshape(-1).astype(int)
    top = None if scores is None else _to_numpy(scores)[: len(imgs)]
    lw = max(round(max(th, tw) / 150), 1)
    for i in range(len(imgs)):
        y0, x0 = (i // ns) * th, (i % ns) * tw
        text = lookup.get(int(labels[i]), str(labels[i]))
        if top is not None:
            j = int(top[i].argmax())
            text = f"{text} -> {lookup.get(j, str(j))} {top[i, j]:.2f}"
        _label_box(mosaic, x0, y0, text, class_color(int(labels[i])), lw)
    return _write_mosaic(mosaic, fname)
