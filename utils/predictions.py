"""Detections written out as YOLOv5's detect.py writes them: label rows, predictions.csv, box crops and count summaries."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.files import safe_component
from utils.segmentation import mask_to_polygon


def write_labels(det: torch.Tensor, shape: tuple[int, int], file: Path, save_conf: bool, save_format: int = 0) -> None:
    """Append `class box [conf]` rows to `file`, box normalised to the original image: cx cy w h (YOLO, save_format 0)
    or x1 y1 x2 y2 (Pascal-VOC corners, save_format 1), as YOLOv5's --save-format."""
    gn = torch.tensor(shape, dtype=torch.float32)[[1, 0, 1, 0]]
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
        for *xyxy, conf, cls in det[:, :6].tolist():
            box = torch.tensor(xyxy).view(1, 4)
            coords = ((xyxy2xywh(box) if save_format == 0 else box) / gn).view(-1).tolist()
            row = (int(cls), *coords, conf) if save_conf else (int(cls), *coords)
            f.write(("%g " * len(row)).rstrip() % row + "\n")


def write_polygon_labels(det: torch.Tensor, masks: np.ndarray, file: Path, save_conf: bool) -> None:
    """Append `class x1 y1 ... xn yn [conf]` rows (each instance's outline, normalised to the (n, h, w) masks' image) to `file`."""
    h, w = masks.shape[1:] if masks.ndim == 3 else (1, 1)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
        for (conf, cls), mask in zip(det[:, 4:6].tolist(), masks):
            outline = mask_to_polygon(mask)
            if len(outline) < 3:  # too small to outline
                continue
            coords = (outline / np.array([w, h], dtype=np.float32)).reshape(-1).tolist()
            row = (int(cls), *coords, conf) if save_conf else (int(cls), *coords)
            f.write(("%g " * len(row)).rstrip() % row + "\n")


CSV_HEADER = ("Image Name", "Prediction", "Confidence")


def write_csv_rows(det: torch.Tensor, image_name: str, names: list[str], file: Path) -> None:
    """Append one `Image Name,Prediction,Confidence` row per detection to predictions.csv (header first), as YOLOv5's --save-csv."""
    new = not file.exists()
    with file.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_HEADER)
        for *_, conf, cls in det[:, :6].tolist():
            writer.writerow((image_name, names[int(cls)] if int(cls) < len(names) else str(int(cls)), f"{conf:.2f}"))


def box_crops(det: torch.Tensor, im0: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(row index, pixels) of each (n, 6) pixel-xyxy detection clipped to the image; boxes with no area are left out."""
    h, w = im0.shape[:2]
    crops = []
    for i, (*xyxy, _, _) in enumerate(det[:, :6].tolist()):
        x1, y1, x2, y2 = (int(max(0, min(v, lim))) for v, lim in zip(xyxy, (w, h, w, h)))
        if x2 > x1 and y2 > y1:
            crops.append((i, im0[y1:y2, x1:x2]))
    return crops


def save_crops(det: torch.Tensor, im0: np.ndarray, names: list[str], crop_dir: Path, stem: str) -> list[Path]:
    """Save each detection's box region as crops/<class>/<stem>_<i>.jpg (class names made safe folder names)."""
    written = []
    for i, crop in box_crops(det, im0):
        cls = int(det[i, 5])
        out = crop_dir / safe_component(names[cls] if cls < len(names) else str(cls)) / f"{safe_component(stem)}_{i}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), crop):
            raise ValueError(f"{out}: could not write crop")
        written.append(out)
    return written


def describe(det: torch.Tensor, names: list[str]) -> str:
    """'2 circles, 1 square' style counts per class."""
    if not len(det):
        return "(no detections)"
    counts = det[:, 5].int().bincount()
    return ", ".join(f"{n} {names[c] if c < len(names) else c}{'s' * (n > 1)}" for c, n in enumerate(counts.tolist()) if n)
