"""Augmentations: HSV jitter, perspective warp with box filtering, mixup, flips, and mosaic through the dataset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.data.augmentations import augment_hsv, box_candidates, flip_labels, mixup, random_perspective
from utils.data.datasets import LoadImagesAndLabels


def checker(h: int = 64, w: int = 96) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[::8] = (20, 180, 90)
    img[:, ::8] = (200, 40, 120)
    return img


def test_augment_hsv_zero_gain_is_identity_and_gain_changes():
    img = checker()
    ref = img.copy()
    augment_hsv(img, 0, 0, 0)
    assert np.array_equal(img, ref)
    augment_hsv(img, 0.5, 0.7, 0.4, rng=np.random.default_rng(0))
    assert img.dtype == np.uint8 and img.shape == ref.shape and not np.array_equal(img, ref)


def test_augment_hsv_value_only_scales_brightness():
    img = np.full((8, 8, 3), 100, np.uint8)  # grey: hue/saturation changes cannot show
    rng = np.random.default_rng(1)
    expected_gain = rng.uniform(-1, 1, 3)[2] * 0.4 + 1
    augment_hsv(img, 0, 0, 0.4, rng=np.random.default_rng(1))
    assert abs(int(img[0, 0, 0]) - int(100 * expected_gain)) <= 1 and (img == img[0, 0, 0]).all()


def test_random_perspective_identity_keeps_everything():
    img = checker()
    targets = np.array([[1, 10, 12, 40, 30], [0, 50, 5, 90, 60]], np.float32)
    out, t = random_perspective(img, targets, degrees=0, translate=0, scale=0, shear=0, perspective=0)
    assert np.array_equal(out, img)
    np.testing.assert_allclose(t, targets, atol=1e-4)


def test_random_perspective_translation_moves_boxes_and_filters():
    img = checker()
    targets = np.array([[0, 10, 10, 30, 30], [1, 80, 40, 95, 63]], np.float32)
    rng = np.random.default_rng(5)
    out, t = random_perspective(img, targets, degrees=0, translate=0.4, scale=0, shear=0, rng=rng)
    rng = np.random.default_rng(5)
    rng.uniform(size=4)  # perspective x2, scale, rotation draws
    rng.uniform(size=2)  # shear draws
    dx, dy = (rng.uniform(0.1, 0.9) - 0.5) * 96, (rng.uniform(0.1, 0.9) - 0.5) * 64
    assert out.shape == img.shape
    for row in t:  # every kept box is the original shifted by (dx, dy), clipped to the image
        src = targets[targets[:, 0] == row[0]][0]
        shifted = np.clip(src[1:] + [dx, dy, dx, dy], 0, [96, 64, 96, 64])
        np.testing.assert_allclose(row[1:], shifted, atol=1e-3)


def test_random_perspective_mosaic_border_crops_to_half():
    canvas = np.full((128, 128, 3), 7, np.uint8)
    targets = np.array([[0, 40, 40, 80, 80]], np.float32)
    out, t = random_perspective(canvas, targets, degrees=0, translate=0, scale=0, shear=0, border=(-32, -32))
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(t[0, 1:], [8, 8, 48, 48], atol=1e-4)  # centre of the 128 canvas -> centre of 64 output


def test_box_candidates():
    before = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [20, 20, 2.5, 20], [20, 20, 20, 20]], float)  # columns = boxes
    after = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [20, 1.5, 2.5, 20], [20, 20, 20, 1]], float)
    assert box_candidates(before, after).tolist() == [True, False, True, False]  # kept, too thin, ok (>2px), area < 10%


def test_mixup_blends_and_concatenates():
    a, b = np.full((16, 16, 3), 200, np.uint8), np.full((16, 16, 3), 0, np.uint8)
    la, lb = np.ones((2, 5), np.float32), np.zeros((1, 5), np.float32)
    img, labels = mixup(a, la, b, lb, rng=np.random.default_rng(0))
    assert labels.shape == (3, 5) and img.shape == a.shape
    assert 60 < img.mean() < 140  # Beta(32, 32) ratio is close to 0.5


def test_flip_labels():
    lb = np.array([[0, 0.2, 0.3, 0.1, 0.1]], np.float32)
    np.testing.assert_allclose(flip_labels(lb.copy(), lr=True)[0], [0, 0.8, 0.3, 0.1, 0.1])
    np.testing.assert_allclose(flip_labels(lb.copy(), lr=False)[0], [0, 0.2, 0.7, 0.1, 0.1])


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 45), st.floats(0, 0.4), st.floats(0, 0.9), st.floats(0, 20), st.floats(0, 0.001), st.integers(0, 10**6))
def test_random_perspective_boxes_stay_inside(degrees, translate, scale, shear, perspective, seed):
    img = checker(48, 80)
    targets = np.array([[0, 5, 5, 30, 40], [1, 40, 10, 78, 46], [2, 20, 20, 24, 24]], np.float32)
    out, t = random_perspective(img, targets, degrees, translate, scale, shear, perspective, rng=np.random.default_rng(seed))
    assert out.shape == img.shape and t.shape[1] == 5
    assert (t[:, 1:] >= 0).all() and (t[:, [1, 3]] <= 80).all() and (t[:, [2, 4]] <= 48).all()
    assert ((t[:, 3] - t[:, 1]) > 2).all() and ((t[:, 4] - t[:, 2]) > 2).all()


@pytest.fixture
def tiny_ds(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(4):
        img = np.full((60 + 10 * i, 80, 3), 50, np.uint8)
        cv2.rectangle(img, (10, 10), (40, 30), (0, 255, 255), -1)
        cv2.imwrite(str(images / f"{i}.jpg"), img)
        (tmp_path / "labels" / f"{i}.txt").write_text(f"{i % 3} {25 / 80} {20 / img.shape[0]} {30 / 80} {20 / img.shape[0]}\n")
    return images


def test_mosaic_output_and_labels_inside(tiny_ds):
    np.random.seed(0)
    ds = LoadImagesAndLabels(tiny_ds, img_size=64, augment=True, hyp={"mosaic": 1.0, "mixup": 0.0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0})
    img, labels = ds.load_mosaic(0)
    assert img.shape == (64, 64, 3) and labels.shape[1] == 5
    assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 64).all()
    for _ in range(10):
        im, lb, _, shapes = ds[0]
        assert im.shape == (3, 64, 64) and shapes is None
        assert ((lb[:, 2:] >= 0) & (lb[:, 2:] <= 1)).all() and (lb[:, 4:] > 0).all()
        for _, _, cx, cy, w, h in lb.numpy():  # every box covers yellow (R+G high, B low) object pixels
            x1, y1, x2, y2 = (int(round(v * 64)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            patch = im[:, y1:y2, x1:x2].float()
            assert patch.numel() and (patch[0] > 200).float().mean() > 0.5 and (patch[2] < 60).float().mean() > 0.5


def test_close_mosaic_switches_to_letterbox(tiny_ds):
    ds = LoadImagesAndLabels(tiny_ds, img_size=64, augment=True, hyp={"mosaic": 1.0})
    assert ds.mosaic
    ds.close_mosaic()
    _, _, _, shapes = ds[1]
    assert shapes is not None and shapes[0] == (70, 80)


def test_flip_in_dataset_mirrors_labels(tiny_ds):
    hyp = {"mosaic": 0.0, "fliplr": 1.0, "flipud": 0.0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "translate": 0, "scale": 0}
    aug = LoadImagesAndLabels(tiny_ds, img_size=64, augment=True, hyp=hyp)
    plain = LoadImagesAndLabels(tiny_ds, img_size=64, augment=True, hyp={**hyp, "fliplr": 0.0})
    im_a, lb_a, _, _ = aug[0]
    im_p, lb_p, _, _ = plain[0]
    assert np.array_equal(im_a.numpy(), im_p.numpy()[:, :, ::-1])
    np.testing.assert_allclose(lb_a[:, 2].numpy(), 1 - lb_p[:, 2].numpy(), atol=1e-6)
