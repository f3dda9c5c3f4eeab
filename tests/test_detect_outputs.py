"""Text outputs of detect.py and val.py (utils/predictions.py): YOLO or Pascal-VOC label rows and predictions.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import detect
from utils.predictions import write_csv_rows, write_labels

# one detection in a 200 x 100 (w x h) image: box x 20..60, y 10..50, conf 0.875, class 1
DET = torch.tensor([[20.0, 10.0, 60.0, 50.0, 0.875, 1.0]])


def test_yolo_and_pascal_voc_label_rows(tmp_path: Path) -> None:
    write_labels(DET, (100, 200), tmp_path / "yolo.txt", save_conf=True, save_format=0)
    write_labels(DET, (100, 200), tmp_path / "voc.txt", save_conf=False, save_format=1)
    assert (tmp_path / "yolo.txt").read_text() == "1 0.2 0.3 0.2 0.4 0.875\n"  # centre (40, 30), size 40 x 40, normalised
    assert (tmp_path / "voc.txt").read_text() == "1 0.1 0.1 0.3 0.5\n"  # corners, normalised


def test_csv_rows_with_header_once(tmp_path: Path) -> None:
    file = tmp_path / "predictions.csv"
    write_csv_rows(DET, "a.jpg", ["cat", "dog"], file)
    write_csv_rows(torch.cat((DET, DET)), "b.jpg", ["cat", "dog"], file)
    rows = list(csv.reader(file.open(newline="", encoding="utf-8")))
    row = ["dog", "0.88"]
    assert rows == [["Image Name", "Prediction", "Confidence"], ["a.jpg", *row], ["b.jpg", *row], ["b.jpg", *row]]


def test_bad_save_format_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--save-format 2: 0 \\(YOLO"):
        detect.run(weights=str(tmp_path / "none.pt"), save_format=2, project=str(tmp_path))
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        detect.parse_opt(["--save-format", "3"])
