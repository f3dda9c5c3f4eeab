"""AutoAnchor: recall metrics, k-means + evolution fitting, and installing anchors into the Detect head."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models.model import DetectionModel
from utils.tasks.autoanchor import anchor_metrics, check_anchors, kmean_anchors, label_wh_from_dataset


@pytest.fixture
def model() -> DetectionModel:
    return DetectionModel("yolov5n.yaml", nc=3)


def _pixel_anchors(model: DetectionModel) -> np.ndarray:
    det = model.detect
    return (det.anchors * det.stride.view(-1, 1, 1)).view(-1, 2).numpy()


def _clustered_wh(centres: np.ndarray, per: int = 40, seed: int = 0) -> np.ndarray:
    """Boxes scattered +-10% around each centre size."""
    rng = np.random.default_rng(seed)
    return np.concatenate([c * rng.uniform(0.9, 1.1, size=(per, 2)) for c in centres]).astype(np.float32)


def test_anchor_metrics_known_values():
    anchors = np.array([[10.0, 10.0], [100.0, 100.0]])
    wh = np.array([[10.0, 10.0], [30.0, 30.0], [500.0, 500.0]])
    bpr, aat = anchor_metrics(anchors, wh, thr=4.0)
    assert bpr == pytest.approx(2 / 3)  # 500 px is 5x the largest anchor
    assert aat == pytest.approx((1 + 2 + 0) / 3)  # 30 px is within 4x of both anchors


def test_good_anchors_are_kept(model):
    before = model.detect.anchors.clone()
    wh = _clustered_wh(_pixel_anchors(model))
    assert anchor_metrics(_pixel_anchors(model), wh)[0] == pytest.approx(1.0)
    assert check_anchors(wh, model, thr=4.0, imgsz=640) is False
    assert torch.equal(model.detect.anchors, before)


def test_kmeans_improves_bpr_for_mismatched_boxes(model):
    centres = np.array([[400.0, 12.0], [12.0, 400.0], [300.0, 300.0]])  # extreme aspect ratios: default anchors miss
    wh = _clustered_wh(centres)
    bpr_old, _ = anchor_metrics(_pixel_anchors(model), wh)
    new = kmean_anchors(wh, n=9, img_size=640, gen=100, seed=0)
    assert new.shape == (9, 2)
    assert np.all(np.diff(new.prod(1)) >= 0)  # area ascending
    bpr_new, _ = anchor_metrics(new, wh)
    assert bpr_old < 0.9
    assert bpr_new > bpr_old and bpr_new > 0.98


def test_kmeans_deterministic_with_seed():
    wh = _clustered_wh(np.array([[20.0, 30.0], [60.0, 40.0], [150.0, 200.0]]), per=30)
    a = kmean_anchors(wh, n=6, gen=50, seed=3)
    b = kmean_anchors(wh, n=6, gen=50, seed=3)
    np.testing.assert_array_equal(a, b)


def test_kmeans_filters_tiny_boxes_with_warning(caplog):
    wh = np.concatenate([_clustered_wh(np.array([[40.0, 40.0], [80.0, 120.0]]), per=10), np.full((5, 2), 1.0)])
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        k = kmean_anchors(wh, n=3, gen=20)
    assert "smaller than 3 pixels" in caplog.text
    assert (k >= 2.0).all()


def test_kmeans_too_few_labels_raises():
    with pytest.raises(ValueError, match="need at least 9"):
        kmean_anchors(np.array([[10.0, 10.0], [20.0, 20.0]]), n=9, gen=5)


def test_check_anchors_installs_ordered_grid_anchors(model):
    centres = np.array([[400.0, 12.0], [12.0, 400.0], [300.0, 300.0], [200.0, 8.0]])
    wh = _clustered_wh(centres)
    changed = check_anchors(wh, model, thr=4.0, imgsz=640)
    assert changed is True
    det = model.detect
    assert det.anchors.shape == (det.nl, det.na, 2)
    pixels = det.anchors * det.stride.view(-1, 1, 1)
    areas = pixels.prod(-1).view(-1)
    assert torch.all(areas[1:] >= areas[:-1] - 1e-3)  # area ascending with the ascending strides
    bpr_new, _ = anchor_metrics(pixels.view(-1, 2).numpy(), wh)
    assert bpr_new > 0.98
    # the loss and decode read the same buffer, so the state dict carries the new anchors
    assert torch.equal(model.state_dict()["model.24.anchors"], det.anchors)


def test_check_anchors_keeps_when_too_few_labels(model):
    before = model.detect.anchors.clone()
    assert check_anchors(np.array([[600.0, 5.0]]), model) is False
    assert torch.equal(model.detect.anchors, before)


def test_label_wh_from_dataset():
    shapes = np.array([[200, 100], [100, 400]])  # (w, h)
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.2]]), np.array([[1, 0.5, 0.5, 0.1, 0.5], [0, 0.2, 0.2, 0.2, 0.2]])]
    wh = label_wh_from_dataset(shapes, labels, imgsz=64, jitter=(1.0, 1.0))
    # image 0 letterboxes to 64x32, image 1 to 16x64
    np.testing.assert_allclose(wh, [[32.0, 6.4], [1.6, 32.0], [3.2, 12.8]], rtol=1e-5)
    jittered = label_wh_from_dataset(shapes, labels, imgsz=64)
    ratio = jittered / wh
    assert np.all((ratio >= 0.9) & (ratio <= 1.1))
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5)  # one scale per box keeps the aspect
    np.testing.assert_array_equal(jittered, label_wh_from_dataset(shapes, labels, imgsz=64))
    with pytest.raises(ValueError, match="2 image shapes but 1"):
        label_wh_from_dataset(shapes, labels[:1], imgsz=64)
