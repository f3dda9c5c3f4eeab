"""Tests for utils.plots: every plot writes a real, readable image file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from utils.plots import (
    class_color,
    draw_detections,
    plot_confusion_matrix,
    plot_images,
    plot_labels,
    plot_mc_curve,
    plot_pr_curve,
    plot_results,
)


def _readable(path) -> np.ndarray:
    im = cv2.imread(str(path))
    assert im is not None and im.size > 0, f"{path} is not a readable image"
    return im


def test_pr_and_mc_curves(tmp_path):
    px = np.linspace(0, 1, 1000)
    py = np.stack([1 - px**2, 1 - px])
    ap = np.array([[0.67] * 10, [0.5] * 10])
    _readable(plot_pr_curve(px, py, ap, tmp_path / "pr.png", ["a", "b"]))
    _readable(plot_mc_curve(px, py, tmp_path / "sub" / "f1.png", ["a", "b"], ylabel="F1"))
    _readable(plot_pr_curve(px, np.zeros((0, 1000)), np.zeros((0, 10)), tmp_path / "empty.png", []))


def test_confusion_matrix_plot(tmp_path):
    m = np.array([[5, 1, 0], [0, 3, 2], [1, 0, 0]])
    _readable(plot_confusion_matrix(m, ["x", "y"], tmp_path / "cm.png", normalize=True))
    _readable(plot_confusion_matrix(m, ["x", "y"], tmp_path / "cm_raw.png", normalize=False))


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.integers(0, 3, 40), rng.uniform(0.2, 0.8, (40, 2)), rng.uniform(0.05, 0.4, (40, 2))])
    _readable(plot_labels(labels, ["a", "b", "c"], tmp_path / "labels.jpg"))
    _readable(plot_labels(np.zeros((0, 5)), [], tmp_path / "labels_empty.jpg"))


def test_plot_images_mosaic(tmp_path):
    images = torch.zeros(3, 3, 64, 96)
    images[1] = 1.0
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5], [2, 1, 0.25, 0.25, 0.2, 0.2]])
    mosaic = plot_images(images, targets, paths=["a.jpg", "b.jpg", "c.jpg"], fname=tmp_path / "batch.jpg", names=["p", "q"])
    assert mosaic.shape == (128, 192, 3)  # 2x2 grid of 64x96 tiles
    assert (mosaic[64:, 96:] == 255).all()  # 4th tile is empty padding (white)
    assert mosaic[64 + 40, 48].tolist() == [0, 0, 0]  # 3rd tile is the black image, box-free at this point
    # tile 1 (white image) stays white in its interior, tile 0 (black) has a coloured box edge at x = 0.25*96 = 24
    assert mosaic[32, 96 + 48].tolist() == [255, 255, 255]
    edge = mosaic[30:35, 22:27].reshape(-1, 3).astype(int)  # anti-aliased edge: nearest pixel within a small tolerance
    assert np.abs(edge - np.array(class_color(0, bgr=False))).max(1).min() < 40
    assert mosaic[32, 40].tolist() == [0, 0, 0]  # interior of the box stays black
    _readable(tmp_path / "batch.jpg")


def test_plot_images_pixel_targets_with_conf_and_downscale(tmp_path):
    images = (torch.rand(2, 3, 128, 128) * 255).to(torch.uint8)
    targets = np.array([[0, 1, 64, 64, 40, 40, 0.9], [1, 0, 30, 30, 20, 20, 0.1]])
    mosaic = plot_images(images, targets, fname=tmp_path / "pred.jpg", max_size=128)
    assert mosaic.shape == (128, 128, 3)  # 2x2 grid scaled down to max_size
    _readable(tmp_path / "pred.jpg")


def test_plot_images_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        plot_images(torch.zeros(3, 64, 64), None, fname=tmp_path / "x.jpg")


def test_draw_detections():
    im = np.zeros((100, 120, 3), dtype=np.uint8)
    det = torch.tensor([[10, 20, 60, 80, 0.87, 1], [70, 10, 110, 50, 0.5, 0]])
    out = draw_detections(im, det, ["cat", "dog"], line_width=2)
    assert out.shape == im.shape and im.sum() == 0  # input untouched
    assert out[50, 10].tolist() == list(class_color(1))  # left edge of the dog box in its class colour
    assert out[30, 110].tolist() == list(class_color(0))
    assert out[50, 35].tolist() == [0, 0, 0]  # box interior untouched
    assert np.array_equal(draw_detections(im, np.zeros((0, 6)), []), im)


RESULT_COLS = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss", "x/lr0", "x/lr1", "x/lr2"]


def test_plot_results(tmp_path):
    csv = tmp_path / "results.csv"
    rows = [", ".join(f"{c:>20s}" for c in RESULT_COLS)]
    rows += [", ".join(f"{v:20.5g}" for v in [e, *np.linspace(1, 0, 13) / (e + 1)]) for e in range(5)]
    csv.write_text("\n".join(rows) + "\n")
    out = plot_results(csv)
    assert out == tmp_path / "results.png"
    _readable(out)


def test_plot_results_bad_file(tmp_path):
    with pytest.raises(ValueError, match="missing.csv"):
        plot_results(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="epoch"):
        plot_results(bad)


def test_result_panels_follow_the_heads_loss_columns():
    from utils.engine.results import columns
    from utils.plots import result_panels

    yolov5 = result_panels(columns(("box_loss", "obj_loss", "cls_loss")))
    yolov8 = result_panels(columns(("box_loss", "cls_loss", "dfl_loss")))
    assert yolov5[:5] == ["train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall"]
    assert yolov8[5:] == ["val/box_loss", "val/cls_loss", "val/dfl_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]
    assert len(yolov8) == 10 and "train/obj_loss" not in yolov8
