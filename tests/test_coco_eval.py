"""Tests for utils.evaluation.coco_eval and agreement of our mAP with pycocotools on a synthetic set."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.boxes import xywhn2xyxy
from utils.evaluation.coco_eval import (
    CocoEvalError,
    coco80_to_91,
    coco_image_ids,
    evaluate_coco,
    evaluate_dataset_json,
    predictions_to_coco,
    yolo_to_coco_gt,
)
from utils.evaluation.metrics import ap_per_class, default_iouv, match_predictions

NAMES = ["a", "b", "c"]


def synthetic_set(seed: int = 0, n_images: int = 20, duplicates: bool = False):
    """Random YOLO labels plus detections: jittered ground truth (some misclassified/missed) and random false positives;
    with `duplicates`, each jittered box also gets a lower-scored copy that fits its object better (as NMS-free heads and
    loose NMS leave them)."""
    rng = np.random.default_rng(seed)
    paths, labels, shapes, dets = [], [], [], []
    for i in range(n_images):
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        n = int(rng.integers(0, 7))
        wh = rng.uniform(0.05, 0.4, (n, 2))
        xy = rng.uniform(wh / 2, 1 - wh / 2)
        lab = np.column_stack([rng.integers(0, 3, n), xy, wh])
        px = xywhn2xyxy(lab[:, 1:], w, h)
        rows = []
        for c, box in zip(lab[:, 0], px):
            if rng.random() < 0.15:
                continue  # missed object
            size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            jittered = box + rng.normal(0, 0.06, 4) * size
            cls = c if rng.random() < 0.9 else (c + 1) % 3
            rows.append([*jittered, rng.uniform(0.3, 1.0), cls])
            if duplicates:
                rows.append([*(box + rng.normal(0, 0.02, 4) * size), rows[-1][4] * rng.uniform(0.05, 0.5), cls])
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            rows.append([x1, y1, x1 + rng.uniform(10, w * 0.2), y1 + rng.uniform(10, h * 0.2), rng.uniform(0.0, 0.7), rng.integers(0, 3)])
        paths.append(f"img_{i}.jpg")
        labels.append(lab)
        shapes.append((h, w))
        dets.append(np.asarray(rows, dtype=np.float64).reshape(-1, 6))
    return paths, labels, shapes, dets


def our_map(labels, shapes, dets) -> tuple[float, float]:
    """mAP via match_predictions + ap_per_class, on the same rounded boxes pycocotools sees."""
    iouv = default_iouv()
    tps, confs, pcls, tcls = [], [], [], []
    for lab, (h, w), d in zip(labels, shapes, dets):
        d = d.copy()
        d[:, :4] = np.round(d[:, :4], 3)
        gt = torch.from_numpy(np.column_stack([lab[:, 0], xywhn2xyxy(lab[:, 1:], w, h)])).float()
        dt = torch.from_numpy(d).float()
        tps.append(match_predictions(dt, gt, iouv).numpy())
        confs.append(d[:, 4])
        pcls.append(d[:, 5])
        tcls.append(lab[:, 0])
    *_, ap, _ = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))
    return float(ap.mean()), float(ap[:, 0].mean())


def test_yolo_to_coco_gt_layout():
    lab = np.array([[1, 0.5, 0.5, 0.2, 0.4], [0, 0.1, 0.2, 0.2, 0.2]])
    paths = ["x/000123.jpg", "x/000007.jpg"]
    by_index = yolo_to_coco_gt(paths, [lab, np.zeros((0, 5))], [(100, 200), (50, 50)], NAMES)
    assert [im["id"] for im in by_index["images"]] == [0, 1]
    gt = yolo_to_coco_gt(paths, [lab, np.zeros((0, 5))], [(100, 200), (50, 50)], NAMES, image_ids=coco_image_ids(paths))
    assert [im["id"] for im in gt["images"]] == [123, 7]
    assert gt["images"][0] == {"id": 123, "file_name": "000123.jpg", "height": 100, "width": 200}
    a0 = gt["annotations"][0]
    assert a0["image_id"] == 123 and a0["category_id"] == 1 and a0["iscrowd"] == 0
    assert a0["bbox"] == pytest.approx([80.0, 30.0, 40.0, 40.0])
    assert a0["area"] == pytest.approx(1600.0)
    assert len({a["id"] for a in gt["annotations"]}) == 2
    assert gt["categories"] == [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "c"}]
    with pytest.raises(ValueError, match="distinct image ids"):
        yolo_to_coco_gt(paths, [lab, lab], [(10, 10)] * 2, NAMES, image_ids=[3, 3])


def test_image_ids_fall_back_to_index():
    assert coco_image_ids(["1.jpg", "2.jpg"]) == [1, 2]
    assert coco_image_ids(["a.jpg", "2.jpg"]) == [0, 1]
    assert coco_image_ids(["d1/5.jpg", "d2/5.jpg"]) == [0, 1]  # duplicate stems


def test_predictions_to_coco_rounding_and_class_map():
    d = torch.tensor([[10.12345, 20.0, 30.5, 60.25, 0.123456789, 2]])
    (r,) = predictions_to_coco([d], [42])
    assert r == {"image_id": 42, "category_id": 2, "bbox": [10.123, 20.0, 20.377, 40.25], "score": 0.12346}
    (r,) = predictions_to_coco([d.numpy()], [42], class_map=coco80_to_91())
    assert r["category_id"] == 3
    assert len(coco80_to_91()) == 80 and coco80_to_91()[-1] == 90
    with pytest.raises(ValueError):
        predictions_to_coco([d], [1, 2])


def test_matches_pycocotools_on_synthetic_set(tmp_path):
    pytest.importorskip("pycocotools")
    paths, labels, shapes, dets = synthetic_set()
    gt = yolo_to_coco_gt(paths, labels, shapes, NAMES)
    preds = predictions_to_coco(dets, list(range(len(paths))))
    assert len(preds) > 50 and len(gt["annotations"]) > 40
    coco_map, coco_map50 = evaluate_coco(gt, preds)
    ours, ours50 = our_map(labels, shapes, dets)
    assert 0.2 < coco_map < 0.9  # a non-trivial set: neither perfect nor empty
    assert abs(ours - coco_map) < 0.02
    assert abs(ours50 - coco_map50) < 0.02
    # same numbers through json files on disk
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    assert evaluate_coco(tmp_path / "gt.json", tmp_path / "pred.json") == pytest.approx((coco_map, coco_map50))


def test_duplicates_are_matched_by_score_as_pycocotools_does():
    """A label goes to the highest-scored detection that overlaps it enough, not to the best-fitting one: matching by IoU
    first scores a lower-scored, better-fitting duplicate true and its original false, far below COCO's mAP."""
    pytest.importorskip("pycocotools")
    paths, labels, shapes, dets = synthetic_set(seed=1, duplicates=True)
    coco_map, coco_map50 = evaluate_coco(yolo_to_coco_gt(paths, labels, shapes, NAMES), predictions_to_coco(dets, list(range(len(paths)))))
    ours, ours50 = our_map(labels, shapes, dets)
    assert 0.2 < coco_map < 0.9
    assert abs(ours - coco_map) < 0.02 and abs(ours50 - coco_map50) < 0.02


def test_perfect_predictions_score_one():
    pytest.importorskip("pycocotools")
    paths, labels, shapes, _ = synthetic_set(seed=1, n_images=5)
    dets = [np.column_stack([xywhn2xyxy(lab[:, 1:], w, h), np.ones(len(lab)), lab[:, 0]]) for lab, (h, w) in zip(labels, shapes)]
    m, m50 = evaluate_coco(yolo_to_coco_gt(paths, labels, shapes, NAMES), predictions_to_coco(dets, range(len(paths))))
    assert m == pytest.approx(1.0, abs=1e-6) and m50 == pytest.approx(1.0, abs=1e-6)


def test_empty_predictions_and_bad_inputs(tmp_path):
    pytest.importorskip("pycocotools")
    paths, labels, shapes, _ = synthetic_set(seed=2, n_images=3)
    gt = yolo_to_coco_gt(paths, labels, shapes, NAMES)
    assert evaluate_coco(gt, []) == (0.0, 0.0)
    with pytest.raises(CocoEvalError, match="nope.json"):
        evaluate_coco(tmp_path / "nope.json", [])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CocoEvalError, match="broken.json"):
        evaluate_coco(gt, tmp_path / "broken.json")
    stray = [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(CocoEvalError, match="do not match"):
        evaluate_coco(gt, stray)


def test_missing_pycocotools_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        evaluate_coco({"images": [], "annotations": [], "categories": []}, [])


def test_evaluate_dataset_json_scores_a_yolo_dataset(tmp_path, monkeypatch):
    """val.py's --save-json path: ground truth from the dataset's labels and shapes, predictions from the written json."""
    pytest.importorskip("pycocotools")
    paths, labels, shapes, dets = synthetic_set(seed=3, n_images=8)
    dataset = SimpleNamespace(im_files=paths, labels=labels, img_shapes=np.array(shapes, dtype=np.float64))
    preds = predictions_to_coco(dets, list(range(len(paths))))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    got = evaluate_dataset_json(dataset, NAMES, tmp_path / "pred.json", tmp_path)
    assert got == pytest.approx(evaluate_coco(yolo_to_coco_gt(paths, labels, shapes, NAMES), preds))
    assert json.loads((tmp_path / "ground_truth_coco.json").read_text())["images"][0]["file_name"] == "img_0.jpg"
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    assert evaluate_dataset_json(dataset, NAMES, tmp_path / "pred.json", tmp_path) is None
