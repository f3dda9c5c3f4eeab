"""Detections written as text, as YOLOv5's detect.py and val.py write them: YOLO/Pascal-VOC label rows and predictions.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from utils.boxes import xyxy2xywh


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
