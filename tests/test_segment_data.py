"""Segmentation data: polygon labels (parsing and repair), polygon geometry and rasterisation, the mask dataset under
every augmentation path, its collate and loader, and the shapes generator's polygon labels."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.boxes import xywh2xyxy
from utils.data.augmentations import Warp, outline_points
from utils.data.dataset_config import DatasetError, load_dataset_config
from utils.data.datasets import LoadImagesAndLabels
from utils.data.labels import read_label_file, read_segment_label_file
from utils.data.polygons import polygon_area, polygon_to_box, polygons_to_index_mask, polygons_to_masks, resample_polygon, warp_polygons
from utils.data.seg_dataset import LoadImagesAndMasks, create_seg_dataloader
from utils.data.shapes_dataset import SHAPE_NAMES, draw_scene, draw_scene_objects, generate_shapes
from utils.paths import ROOT

TRIANGLE = "0 0.1 0.1 0.5 0.1 0.5 0.4"
NO_AUG = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
ZOOM_SHIFT = {**NO_AUG, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0, "fliplr": 0.5,
              "flipud": 0.5, "mixup": 0.0, "mosaic": 1.0}  # the mosaic's tile path
WARPING = {**ZOOM_SHIFT, "degrees": 8.0, "shear": 3.0, "perspective": 0.0003}  # the mosaic's region path


def write_label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes-seg dataset (polygon labels)."""
    return generate_shapes(tmp_path_factory.mktemp("seg") / "shapes-seg", n_train=8, n_val=3, seed=11, polygons=True)


# ---------- label files ----------

def test_polygon_row_gives_box_and_outline(tmp_path):
    lb, segs, msg, status = read_segment_label_file(write_label(tmp_path / "a.txt", TRIANGLE + "\n"), nc=3)
    assert (status, msg) == ("ok", None) and lb.dtype == np.float32 and lb.shape == (1, 5)
    np.testing.assert_allclose(lb[0], [0, 0.3, 0.25, 0.4, 0.3], atol=1e-6)  # box of the polygon
    assert len(segs) == 1 and segs[0].dtype == np.float32
    np.testing.assert_allclose(segs[0], [[0.1, 0.1], [0.5, 0.1], [0.5, 0.4]], atol=1e-7)


def test_box_rows_become_rectangles_beside_polygons(tmp_path):
    lb, segs, msg, status = read_segment_label_file(write_label(tmp_path / "a.txt", TRIANGLE + "\n1 0.5 0.5 0.2 0.4\n"), nc=3)
    assert status == "ok" and msg is None and len(segs) == len(lb) == 2
    np.testing.assert_allclose(segs[1], [[0.4, 0.3], [0.6, 0.3], [0.6, 0.7], [0.4, 0.7]], atol=1e-6)
    np.testing.assert_allclose(lb[1], [1, 0.5, 0.5, 0.2, 0.4], atol=1e-6)


def test_box_only_file_has_no_outlines_and_detection_labels(tmp_path):
    f = write_label(tmp_path / "a.txt", "1 0.5 0.5 0.2 0.4\n0 0.95 0.5 0.2 0.2\n")
    lb, segs, msg, status = read_segment_label_file(f, nc=3)
    det, det_msg, det_status = read_label_file(f, nc=3)
    assert segs == [] and (msg, status) == (det_msg, det_status) and status == "repaired" and "clipped" in msg
    np.testing.assert_allclose(lb, det, atol=1e-7)


@pytest.mark.parametrize("row,note", [
    ("0 0.1 0.1 0.5 0.1 0.5 0.4 0.2", "skipped 1 rows with an odd number of coordinates"),
    ("0 0.1 0.1", "skipped 1 rows with fewer than 3 points"),  # 5 values would be a box row
    ("0 0.1 nan 0.5 0.1 0.5 0.4", "skipped 1 rows with NaN or infinite values"),
    ("0 0.1 0.1 0.5 inf 0.5 0.4", "skipped 1 rows with NaN or infinite values"),
    ("5 0.1 0.1 0.5 0.1 0.5 0.4", "dropped 1 rows with invalid class [5.0] (nc=3)"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3", "dropped 1 zero-area polygons"),  # collinear
    (TRIANGLE, "removed 1 duplicate rows"),
])
def test_bad_polygon_rows_are_skipped_with_a_note(tmp_path, row, note):
    f = write_label(tmp_path / "a.txt", f"{TRIANGLE}\n{row}\n")
    lb, segs, msg, status = read_segment_label_file(f, nc=3)
    assert status == "repaired" and len(lb) == len(segs) == 1  # the good row stays: one bad row does not spoil the file
    assert msg == f"{f}: {note}"


def test_points_out_of_range_are_clipped(tmp_path):
    lb, segs, msg, status = read_segment_label_file(write_label(tmp_path / "a.txt", "0 -0.2 0.1 0.5 0.1 0.5 1.1\n"))
    assert status == "repaired" and msg.endswith("clipped coordinates out of [0, 1] (by up to 0.2)")
    assert segs[0].min() == 0 and segs[0].max() == 1
    np.testing.assert_allclose(lb[0], [0, 0.25, 0.55, 0.5, 0.9], atol=1e-6)
    lb, segs, msg, status = read_segment_label_file(write_label(tmp_path / "b.txt", "0 -0.0005 0.1 0.5 0.1 0.5 0.4\n"))
    assert (status, msg) == ("ok", None) and segs[0].min() == 0  # rounding noise: clipped silently


def test_all_repairs_in_one_line(tmp_path):
    bad = ["0 0.1", "0 0.2 0.2 0.3", "0 0.1 0.2", "0 nan 0.1 0.5 0.1 0.5 0.4", f"7 {TRIANGLE[2:]}", "0 0.1 0.1 0.2 0.2 0.3 0.3", TRIANGLE]
    text = "".join(f"{row}\n" for row in [TRIANGLE, *bad])
    f = write_label(tmp_path / "a.txt", text)
    lb, segs, msg, status = read_segment_label_file(f, nc=3)
    assert status == "repaired" and len(lb) == len(segs) == 1
    assert msg == (f"{f}: skipped 2 rows with an odd number of coordinates; skipped 1 rows with fewer than 3 points; "
                   "skipped 1 rows with NaN or infinite values; dropped 1 rows with invalid class [7.0] (nc=3); "
                   "dropped 1 zero-area polygons; removed 1 duplicate rows")
    assert read_label_file(f, nc=3)[2] == "corrupt"  # detection keeps its policy for malformed rows


@pytest.mark.parametrize("text,status", [("", "background"), ("0 a b c d e f\n", "corrupt")])
def test_background_and_corrupt_polygon_files(tmp_path, text, status):
    lb, segs, msg, st = read_segment_label_file(write_label(tmp_path / "a.txt", text))
    assert st == status and lb.shape == (0, 5) and segs == []
    assert (msg is None) == (status == "background")


# ---------- polygon geometry ----------

def test_resample_polygon_is_evenly_spaced_on_the_outline():
    sq = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    pts = resample_polygon(sq, 40)
    assert pts.shape == (40, 2)
    steps = np.linalg.norm(np.diff(np.concatenate((pts, pts[:1])), axis=0), axis=1)
    np.testing.assert_allclose(steps, 1.0, atol=1e-9)  # perimeter 40: every point 1 px from the next
    on_edge = (np.isclose(pts, 0) | np.isclose(pts, 10)).any(1)
    assert on_edge.all() and abs(polygon_area(pts) - 100) < 1e-9


def test_polygon_to_box_uses_points_inside_the_image():
    xy = np.array([[-5, 5], [5, -5], [15, 5], [5, 8]], float)
    np.testing.assert_allclose(polygon_to_box(xy, 10, 10), [5, 8, 5, 8])  # (-5, 5), (5, -5) and (15, 5) are outside
    # YOLOv5's rule: the outline's points inside, so resampled the box spans where the outline crosses the image
    np.testing.assert_allclose(polygon_to_box(resample_polygon(xy, 400), 10, 10), [0, 6.5, 10, 8], atol=0.1)
    np.testing.assert_array_equal(polygon_to_box(xy + 100, 10, 10), [0, 0, 0, 0])


def test_polygons_to_masks_rasterise_at_mask_resolution():
    sq = np.array([[8, 8], [40, 8], [40, 24], [8, 24]], float)  # 32 x 16 px
    for ratio in (1, 2, 4):
        masks = polygons_to_masks([sq], (64, 66), ratio)
        assert masks.shape == (1, 64 // ratio, 66 // ratio) and masks.dtype == np.uint8
        ys, xs = np.nonzero(masks[0])
        centres_x, centres_y = (xs + 0.5) * ratio, (ys + 0.5) * ratio  # mask pixel centres in image pixels
        assert centres_x.min() >= 8 - 0.5 and centres_x.max() <= 40 + 0.5 and centres_y.min() >= 8 - 0.5 and centres_y.max() <= 24 + 0.5
        assert abs(masks.sum() - 32 * 16 / ratio**2) <= (32 + 16) * 2 / ratio + 1  # the area, to an edge of pixels
    assert polygons_to_masks([], (64, 64), 4).shape == (0, 16, 16)


def test_index_mask_paints_small_instances_on_top_and_says_whose_value_is_which():
    big = np.array([[0, 0], [60, 0], [60, 60], [0, 60]], float)
    small = np.array([[10, 10], [20, 10], [20, 20], [10, 20]], float)
    mid = np.array([[30, 30], [56, 30], [56, 56], [30, 56]], float)
    polygons = [small, big, mid]
    index, order = polygons_to_index_mask(polygons, (64, 64), 2)
    assert index.shape == (32, 32) and index.dtype == np.uint8 and order.tolist() == [1, 2, 0]  # largest first
    binary = polygons_to_masks(polygons, (64, 64), 2)
    for k, row in enumerate(order):
        covered_later = np.isin(index, np.arange(k + 2, len(order) + 1))
        np.testing.assert_array_equal(index == k + 1, (binary[row] > 0) & ~covered_later)  # value k+1 <-> polygon order[k]
    assert (index[5:10, 5:10] == 3).all()  # the small square stays visible on the big one
    empty, empty_order = polygons_to_index_mask([], (64, 64), 4)
    assert empty.shape == (16, 16) and not empty.any() and len(empty_order) == 0


@pytest.mark.parametrize("seed", range(4))
def test_warped_polygons_match_warped_masks(seed):
    """Rasterise then warp (cv2, nearest) vs warp the polygon then rasterise: the same shape (IoU > 0.95)."""
    rng = np.random.default_rng(seed)
    warp = Warp.draw((256, 256), (0, 0), degrees=30, translate=0.1, scale=0.4, shear=10, perspective=0.0008, rng=rng)
    a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    shapes = [np.array([[60, 40], [190, 70], [90, 200]], float), np.stack((np.cos(a), np.sin(a)), 1) * 50 + 128,
              np.array([[70, 90], [200, 90], [200, 160], [70, 160]], float)]
    for xy in shapes:
        full = polygons_to_masks([xy], (256, 256), 1)[0]
        warped_mask = cv2.warpPerspective(full, warp.matrix, (256, 256), flags=cv2.INTER_NEAREST)
        drawn = polygons_to_masks(warp_polygons([resample_polygon(xy, 500)], warp.matrix, True), (256, 256), 1)[0]
        iou = (warped_mask & drawn).sum() / max((warped_mask | drawn).sum(), 1)
        assert iou > 0.95, (seed, iou)


# ---------- the dataset ----------

def _boxes_px(labels: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(n, 6) [0, cls, cx, cy, w, h] normalised -> (n, 4) xyxy pixels."""
    b = labels[:, 2:].numpy().astype(np.float64) * [w, h, w, h]
    return np.stack((b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2), 1)


@pytest.mark.parametrize("hyp", [ZOOM_SHIFT, WARPING, {**WARPING, "mosaic": 0.0}, {**WARPING, "mixup": 1.0}],
                         ids=["mosaic-tiles", "mosaic-warp", "letterbox-warp", "mixup"])
def test_masks_lie_in_their_boxes_and_on_the_shapes(seg_root, hyp):
    """Under mosaic (both paths), letterbox + warp, mixup and flips: instance k's mask pixels lie in box k, and the
    masks land on the drawn shapes (saturated colours on a dull background), so they moved exactly as the image."""
    ratio = 4
    ds = LoadImagesAndMasks(seg_root / "images" / "train", 128, 4, augment=True, hyp=hyp, mask_ratio=ratio)
    hits = total = 0
    for seed in range(10):
        np.random.seed(seed)
        img, labels, _, _, mask = ds[seed % len(ds)]
        h, w = img.shape[1:]
        assert mask.shape == (h // ratio, w // ratio) and int(mask.max()) <= len(labels)
        boxes = _boxes_px(labels, h, w) + [-ratio, -ratio, ratio, ratio]  # dilated by one mask pixel
        ys, xs = np.nonzero(mask.numpy())
        k = mask.numpy()[ys, xs].astype(int) - 1
        cx, cy = (xs + 0.5) * ratio, (ys + 0.5) * ratio
        inside = (cx >= boxes[k, 0]) & (cx <= boxes[k, 2]) & (cy >= boxes[k, 1]) & (cy <= boxes[k, 3])
        assert inside.all(), (seed, int((~inside).sum()))
        small = cv2.resize(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), (w // ratio, h // ratio), interpolation=cv2.INTER_AREA)
        sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
        hits, total = hits + int((sat[ys, xs] > 100).sum()), total + len(ys)
    limit = 0.75 if hyp["mixup"] else 0.9  # mixup blends in another mosaic (its own shapes too)
    assert total > 100 and hits / total > limit, hits / total


@pytest.mark.parametrize("hyp", [ZOOM_SHIFT, {**WARPING, "degrees": 2.0, "shear": 1.0}], ids=["mosaic-tiles", "mosaic-warp"])
def test_rectangle_masks_fill_their_boxes(seg_root, hyp):
    ratio = 2
    ds = LoadImagesAndMasks(seg_root / "images" / "train", 128, 4, augment=True, hyp=hyp, mask_ratio=ratio, overlap=False)
    checked = 0
    for seed in range(10):
        np.random.seed(seed)
        img, labels, _, _, masks = ds[seed % len(ds)]
        assert masks.shape == (len(labels), img.shape[1] // ratio, img.shape[2] // ratio) and masks.dtype == torch.uint8
        for row, m, box in zip(labels, masks, _boxes_px(labels, *img.shape[1:]) / ratio):
            if int(row[1]) != 1 or min(box[2] - box[0], box[3] - box[1]) < 4:
                continue  # rectangles (class 1) at least 4 mask pixels wide and high
            area = (box[2] - box[0]) * (box[3] - box[1])
            assert int(m.sum()) > 0.75 * area, (seed, int(m.sum()), area)
            checked += 1
    assert checked >= 5


def test_letterbox_item_masks_and_no_augment(seg_root):
    ds = LoadImagesAndMasks(seg_root / "images" / "val", 96, 2, overlap=False, mask_ratio=4)
    ds_index = LoadImagesAndMasks(seg_root / "images" / "val", 96, 2, mask_ratio=4)
    det = LoadImagesAndLabels(seg_root / "images" / "val", 96, 2)
    for i in range(len(ds)):
        img, labels, path, shapes, masks = ds[i]
        d_img, d_labels, d_path, d_shapes = det[i]
        assert torch.equal(img, d_img) and path == d_path and shapes == d_shapes
        torch.testing.assert_close(labels, d_labels)  # boxes of the polygons are the generator's boxes
        assert masks.shape == (len(labels), 24, 24) and (masks.flatten(1).sum(1) > 0).all()
        _, labels_i, _, _, index = ds_index[i]
        assert index.shape == (24, 24) and int(index.max()) == len(labels_i)
        assert sorted(labels_i[:, 1].tolist()) == sorted(labels[:, 1].tolist())  # the same rows, reordered


def test_collate_and_loader(seg_root):
    loader, ds = create_seg_dataloader(seg_root / "images" / "train", 64, 4, 32, augment=True, hyp=NO_AUG, workers=0, mask_ratio=4)
    imgs, targets, paths, shapes, masks = next(iter(loader))
    assert isinstance(ds, LoadImagesAndMasks) and imgs.shape == (4, 3, 64, 64) and masks.shape == (4, 16, 16)
    assert imgs.is_contiguous(memory_format=torch.channels_last) and len(paths) == len(shapes) == 4
    for b in range(4):  # index values of image b run 1..n_b, the order of its rows in targets
        assert int(masks[b].max()) <= int((targets[:, 0] == b).sum())
    items = [LoadImagesAndMasks(seg_root / "images" / "val", 64, 2, overlap=False)[i] for i in range(2)]
    *_, binary = LoadImagesAndMasks.collate_fn(items)
    _, targets, *_ = LoadImagesAndMasks.collate_fn(items)
    assert binary.shape == (len(targets), 16, 16) and binary.dtype == torch.uint8
    for flag in ("quad", "image_weights"):
        with pytest.raises(DatasetError, match="not supported for segmentation"):
            create_seg_dataloader(seg_root / "images" / "train", 64, 4, 32, workers=0, **{flag: True})


def test_caches_of_both_kinds_live_side_by_side(seg_root, caplog):
    images = seg_root / "images" / "train"
    LoadImagesAndLabels(images, 64)
    first = LoadImagesAndMasks(images, 64)
    labels_dir = seg_root / "labels"
    assert (labels_dir / "train.cache").is_file() and (labels_dir / "train.seg.cache").is_file()
    caplog.clear()  # only the two loads below count (an earlier test may have left the logger at INFO)
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        again = LoadImagesAndMasks(images, 64)
        LoadImagesAndLabels(images, 64)
    assert sum("(cached)" in r.getMessage() for r in caplog.records) == 2
    assert all(np.allclose(a, b) for sa, sb in zip(first.segments, again.segments) for a, b in zip(sa, sb))


def test_detection_dataset_is_refused(tmp_path):
    root = generate_shapes(tmp_path / "det", n_train=3, n_val=1, seed=2)
    with pytest.raises(DatasetError) as e:
        LoadImagesAndMasks(root / "images" / "train", 64)
    assert str(e.value) == f"{root / 'images' / 'train'}: no polygon labels found; this is a detection dataset (use train.py)"


def test_box_only_images_get_rectangle_masks(seg_root, tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name in ("train_00000", "train_00001"):
        (tmp_path / "images" / f"{name}.jpg").write_bytes((seg_root / "images" / "train" / f"{name}.jpg").read_bytes())
    (tmp_path / "labels" / "train_00000.txt").write_text((seg_root / "labels" / "train" / "train_00000.txt").read_text())
    (tmp_path / "labels" / "train_00001.txt").write_text("1 0.5 0.5 0.5 0.25\n")
    ds = LoadImagesAndMasks(tmp_path / "images", 64, overlap=False, mask_ratio=1)
    _, labels, _, _, masks = ds[1]
    assert labels.shape == (1, 6) and masks.shape == (1, 64, 64)
    assert abs(int(masks.sum()) - 32 * 16) <= 2 * (32 + 16) + 1  # the box's rectangle


# ---------- the shapes generator ----------

def test_shapes_detection_labels_unchanged():
    """With polygons=False the generator writes the very labels it wrote before polygons existed (fixed seeds)."""
    _, lines = draw_scene(np.random.default_rng(5), 120, 160, 3, n_objects=5)
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == "9f039c80653e88662ae9015bc03a6943fb810f1763404be8d1b700cef290126a"


def test_shapes_generator_labels_unchanged(tmp_path):
    root = generate_shapes(tmp_path / "s", n_train=12, n_val=3, seed=7)
    text = "".join(f"{p.relative_to(root)}\n{p.read_text()}" for p in sorted((root / "labels").rglob("*.txt")))
    assert hashlib.sha256(text.encode()).hexdigest() == "9b2028b57005f3ec75b034c38fdb0f73df350bf98eb3f4e9452763d671168aca"


def test_shapes_polygons_match_boxes_and_images():
    for seed in range(6):
        img, lines = draw_scene(np.random.default_rng(seed), 120, 160, 3)
        img_p, poly_lines = draw_scene(np.random.default_rng(seed), 120, 160, 3, polygons=True)
        _, objects = draw_scene_objects(np.random.default_rng(seed), 120, 160, 3)
        assert np.array_equal(img, img_p) and len(lines) == len(poly_lines) == len(objects)
        for line, poly_line, obj in zip(lines, poly_lines, objects):
            cls, *box = (float(v) for v in line.split())
            pcls, *xy = (float(v) for v in poly_line.split())
            pts = np.array(xy).reshape(-1, 2)
            assert cls == pcls and len(pts) == {0: 32, 1: 4, 2: 3}[obj.cls]
            assert all(len(v.split(".")[1]) == 6 for v in poly_line.split()[1:])
            pbox = [(pts[:, 0].min() + pts[:, 0].max()) / 2, (pts[:, 1].min() + pts[:, 1].max()) / 2, np.ptp(pts[:, 0]), np.ptp(pts[:, 1])]
            tol = 1.1 / 120 if obj.cls == 2 else 1e-6  # triangles: vertices at pixel centres, half a pixel inside the box
            np.testing.assert_allclose(pbox, box, atol=tol)
        drawn = polygons_to_masks([o.polygon for o in objects], img.shape[:2], 1)
        for m in drawn:  # the outline covers the drawn shape: saturated colour inside it
            sat = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[..., 1][m > 0]
            assert (sat > 100).mean() > 0.85


def test_shapes_seg_yaml_generates_polygon_labels(tmp_path):
    cfg = (ROOT / "data" / "shapes-seg.yaml").read_text()
    assert "generator: shapes-seg" in cfg and "path: datasets/shapes-seg" in cfg
    cfg_dict = {"path": str(tmp_path / "sseg"), "train": "images/train", "val": "images/val", "generator": "shapes-seg",
                "names": list(SHAPE_NAMES), "n_train": 3, "n_val": 1, "seed": 7}
    out = load_dataset_config(cfg_dict)
    label = [ln for f in Path(out["path"], "labels").rglob("*.txt") for ln in f.read_text().splitlines()]
    det = generate_shapes(tmp_path / "det", n_train=3, n_val=1, seed=7)
    assert len(label) and all(len(ln.split()) >= 7 for ln in label)
    assert sorted(p.read_bytes() for p in (det / "images").rglob("*.jpg")) == sorted(
        p.read_bytes() for p in Path(out["path"], "images").rglob("*.jpg"))  # the same images


@pytest.mark.parametrize("hyp", [ZOOM_SHIFT, WARPING], ids=["mosaic-tiles", "mosaic-warp"])
def test_mosaic_outlines_match_the_warped_canvas_masks(seg_root, hyp):
    """The mosaic's outlines drawn in the output cover what the instance masks drawn on the whole 2s canvas (cropped
    by its edges) cover once warped like the image: same random draws as load_mosaic (tests/test_loader.py)."""
    ds = LoadImagesAndMasks(seg_root / "images" / "train", 96, 4, augment=True, hyp={**hyp, "scale": 0.6})
    s, hits, missed, got_area, ref_area = ds.img_size, 0, 0, 0, 0
    for seed in range(16):
        np.random.seed(seed)
        yc, xc = (int(np.random.uniform(-b, 2 * s + b)) for b in ds.mosaic_border)
        indices = [seed % len(ds)] + [int(np.random.randint(0, len(ds))) for _ in range(3)]
        warp = Warp.draw((2 * s, 2 * s), ds.mosaic_border, hyp["degrees"], hyp["translate"], 0.6, hyp["shear"], hyp["perspective"])
        grid = warp.on_pixel_grid((2 * s, 2 * s))
        warp = grid[0] if grid is not None else warp
        canvas = np.zeros((2 * s, 2 * s), np.uint8)
        for k, idx in enumerate(indices):
            h, w = ds.resized_shape(idx)
            x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)
            if ds.segments[idx]:
                canvas |= polygons_to_masks([seg * (w, h) + (x1, y1) for seg in ds.segments[idx]], canvas.shape).max(0)
        ref = cv2.warpPerspective(canvas, warp.matrix, (warp.out_w, warp.out_h), flags=cv2.INTER_NEAREST)
        np.random.seed(seed)
        img, labels = ds.load_mosaic(seed % len(ds))
        got = polygons_to_masks(list(outline_points(labels)), img.shape[:2]).max(0, initial=0)
        near_ref, near_got = (cv2.dilate(m, np.ones((3, 3), np.uint8)) for m in (ref, got))  # a pixel of tolerance
        hits, missed = hits + int((got & near_ref).sum()), missed + int((ref & (near_got == 0)).sum())
        got_area, ref_area = got_area + int(got.sum()), ref_area + int(ref.sum())
    # all that is drawn is in the reference; what is missing is the instances dropped as mostly cropped or tiny
    assert hits / got_area > 0.99 and missed / ref_area < 0.05, (hits / got_area, missed / ref_area)


def test_rect_batches_keep_outlines_with_their_labels(seg_root):
    ds = LoadImagesAndMasks(seg_root / "images" / "train", 64, 4, rect=True, pad=0.5, stride=32, single_cls=True, overlap=False)
    for i in range(len(ds)):  # the aspect-ratio sort moved outlines and labels together
        for row, seg in zip(ds.labels[i], ds.segments[i]):
            np.testing.assert_allclose([*seg.min(0), *seg.max(0)], xywh2xyxy(row[1:5]), atol=1e-6)
        img, labels, _, _, masks = ds[i]
        assert masks.shape == (len(labels), img.shape[1] // 4, img.shape[2] // 4) and (labels[:, 1] == 0).all()
