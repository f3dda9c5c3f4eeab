"""Segmentation metrics: mask IoU, the SegmentEvaluator / SegmentResult on hand-made masks, COCO RLE against pycocotools,
mask mAP against pycocotools' `segm` evaluation, and YOLOv5-seg's results.csv columns."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.engine.results import COLUMNS, YOLOV5_SEG_LOSSES, append_results, columns, truncate_results
from utils.evaluation.evaluator import SEG_TABLE_HEADER, SegmentEvaluator, SegmentResult
from utils.evaluation.masks import decode_rle, encode_rle, mask_iou

H = W = 32
NAMES = ("a", "b", "c")


def rect(x1: int, y1: int, x2: int, y2: int, h: int = H, w: int = W) -> torch.Tensor:
    """(h, w) bool mask of the pixels x1 <= x < x2, y1 <= y < y2."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def box_of(mask: torch.Tensor) -> list[float]:
    """Tight xyxy box (pixel edges) of a non-empty mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def image(dets: list[tuple[torch.Tensor, float, int]], labels: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    """One image's evaluator inputs: detections boxed from their masks, labels boxed from theirs, and both mask stacks."""
    pred = torch.tensor([[*box_of(m), conf, c] for m, conf, c in dets], dtype=torch.float32).reshape(-1, 6)
    lab = torch.tensor([[c, *box_of(m)] for m, c in labels], dtype=torch.float32).reshape(-1, 5)
    pm = torch.stack([m for m, _, _ in dets]) if dets else torch.zeros(0, H, W, dtype=torch.bool)
    gm = torch.stack([m for m, _ in labels]) if labels else torch.zeros(0, H, W, dtype=torch.bool)
    return pred, lab, pm, gm


def evaluate(images: list[tuple[torch.Tensor, ...]], nc: int = 3) -> SegmentResult:
    ev = SegmentEvaluator(nc, NAMES[:nc])
    preds, labels, pms, gms = (list(x) for x in zip(*images))
    ev.update(preds, labels, pms, gms)
    return ev.compute()


# ---- mask IoU and the evaluator on hand-made cases ------------------------------------------------------------------


def test_mask_iou_hand_values() -> None:
    a = torch.stack((rect(0, 0, 10, 10), rect(0, 0, 5, 10))).reshape(2, -1)
    b = torch.stack((rect(0, 0, 10, 10), rect(20, 20, 30, 30), rect(5, 0, 15, 10))).reshape(3, -1)
    iou = mask_iou(a, b)
    assert iou.shape == (2, 3)
    assert torch.allclose(iou, torch.tensor([[1.0, 0.0, 50 / 150], [0.5, 0.0, 0.0]]))
    assert mask_iou(a.float(), b[:0]).shape == (2, 0)


def test_perfect_masks_score_one() -> None:
    a, b = rect(2, 2, 12, 12), rect(15, 15, 30, 25)
    r = evaluate([image([(a, 0.9, 0), (b, 0.8, 1)], [(a, 0), (b, 1)])])
    assert r.metrics() == pytest.approx((1.0,) * 8)
    assert r.fitness() == pytest.approx(2.0)
    assert r.maps.tolist() == pytest.approx([2.0, 2.0, 2.0])  # box + mask per class (class c: the means)
    assert r.seen == 1 and r.instances.tolist() == [1, 1, 0]


def test_mask_iou_062_is_correct_at_three_thresholds() -> None:
    gt = rect(0, 0, 10, 10)  # 100 pixels
    pred = rect(0, 0, 10, 10).clone()
    pred[:, :] = False
    pred.view(-1)[torch.nonzero(gt.view(-1)).flatten()[:62]] = True  # 62 of them: IoU 0.62, box IoU 0.7 (rows 0..6)
    ev = SegmentEvaluator(1, ("a",))
    pred_det = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0]])  # the box itself is perfect
    ev.update([pred_det], [torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0]])], [pred[None]], [gt[None]])
    assert ev.mask.arrays()[0].tolist() == [[True] * 3 + [False] * 7]  # 0.5, 0.55, 0.6 only
    r = ev.compute()
    assert (r.map50, r.map) == pytest.approx((1.0, 1.0))
    assert (r.mask.map50, r.mask.map, r.mask.precision, r.mask.recall) == pytest.approx((1.0, 0.3, 1.0, 1.0))
    assert r.fitness() == pytest.approx(0.1 + 0.9 + 0.1 + 0.9 * 0.3)
    assert r.maps.tolist() == pytest.approx([1.3])


def test_wrong_class_scores_zero() -> None:
    r = evaluate([image([(rect(2, 2, 12, 12), 0.9, 1)], [(rect(2, 2, 12, 12), 0)])])
    assert r.metrics() == (0.0,) * 8 and r.fitness() == 0.0 and r.maps.tolist() == [0.0, 0.0, 0.0]


def test_good_box_bad_mask_and_per_class_table() -> None:
    # the boxes match exactly, but the masks are disjoint halves of the box: mask IoU 0
    # boxes match exactly, but the masks are disjoint halves of the box: mask IoU 0
    det, lab, _, gm = image([(rect(0, 0, 10, 10), 0.9, 0)], [(rect(0, 0, 10, 10), 0)])
    gm[0, :, :5] = False
    pm = rect(0, 0, 5, 10)[None]
    r = evaluate([(det, lab, pm, gm)])
    assert r.metrics()[:4] == (1.0,) * 4
    r2 = evaluate([image([(rect(0, 0, 10, 10), 0.9, 0)], [(rect(0, 0, 10, 10), 0)])])
    assert r.metrics()[4:] == (0.0,) * 4 and r.mask.per_class.ap_class.size == 0
    lines = r.table(verbose=True)
    assert lines[0] == ("%22s" + "%11s" * 10) % SEG_TABLE_HEADER
    assert lines[0].split() == ["Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)", "Mask(P", "R", "mAP50", "mAP50-95)"]
    assert len(lines) == 3 and lines[2].split()[0] == "a" and lines[2].split()[-4:] == ["0"] * 4  # mask columns of class a
    assert lines[1].split()[:3] == ["all", "1", "1"]
    assert r2.table(verbose=False)[1].split()[3:] == ["1"] * 8


def test_results_row_order_and_loss() -> None:
    ev = SegmentEvaluator(1, ("a",))
    gt = rect(0, 0, 10, 10)
    half = rect(0, 0, 10, 7)  # mask IoU 0.7: correct at 0.5 .. 0.7 (5 thresholds)
    ev.update([torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0]])], [torch.tensor([[0.0, 0, 0, 10, 10]])], [half[None]], [gt[None]])
    ev.add_loss(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    row = ev.compute().results_row()
    assert row == pytest.approx((1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 2.0, 3.0, 4.0))


def test_update_checks_masks() -> None:
    ev = SegmentEvaluator(1, ("a",))
    det, lab, pm, gm = image([(rect(0, 0, 4, 4), 0.9, 0)], [(rect(0, 0, 4, 4), 0)])
    with pytest.raises(ValueError, match="pred_masks"):
        ev.update([det], [lab])
    with pytest.raises(ValueError, match="common"):
        ev.update([det], [lab], [pm[:, :16]], [gm])
    with pytest.raises(ValueError, match="1 prediction"):
        ev.update([det], [lab], [pm, pm], [gm])
    ev.update([det[:0]], [lab], [pm[:0]], [gm])  # no detections: nothing to match, the label still counts
    assert ev.compute().instances.tolist() == [1] and ev.seen == 1
    ev.reset()
    assert ev.mask.arrays()[0].shape == (0, 10) and ev.seen == 0


# ---- COCO RLE ---------------------------------------------------------------------------------------------------------


def _edge_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((7, 5), bool), np.ones((7, 5), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool), np.ones((1, 9), bool)]
    for y, x in ((0, 0), (6, 4), (3, 2), (0, 4), (6, 0)):  # single pixels, corners included
        m = np.zeros((7, 5), bool)
        m[y, x] = True
        out.append(m)
    big = np.zeros((101, 67), bool)
    big[10:90, 5:60] = True  # long runs: several 5-bit groups, and negative run differences
    big[40:45, 20:22] = False
    out.append(big)
    out += [rng.random((h, w)) < p for h, w, p in ((13, 17, 0.5), (31, 9, 0.1), (64, 48, 0.9), (3, 200, 0.3), (99, 1, 0.5))]
    return out


def test_rle_round_trip() -> None:
    for m in _edge_masks():
        rle = encode_rle(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), m.astype(np.uint8))
    assert decode_rle({"size": [2, 2], "counts": [1, 2, 1]}).tolist() == [[0, 1], [1, 0]]  # uncompressed, column-major
    with pytest.raises(ValueError):
        encode_rle(np.zeros((2, 2, 2), bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools.mask.decode under numpy 2
def test_rle_matches_pycocotools() -> None:
    mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed")
    for m in _edge_masks():
        theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = encode_rle(m)
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
        assert np.array_equal(decode_rle(theirs), mask_utils.decode(theirs))


# ---- mask mAP against pycocotools' segm evaluation ------------------------------------------------------------------


def _coco_case() -> tuple[list[list[tuple[torch.Tensor, float, int]]], list[list[tuple[torch.Tensor, int]]]]:
    """Two images, two classes: matches at assorted mask IoUs (none on a threshold), false positives and a miss."""
    gts = [
        [(rect(2, 2, 22, 22), 0), (rect(24, 4, 31, 30), 1)],
        [(rect(1, 1, 11, 9), 0), (rect(14, 14, 30, 30), 0), (rect(20, 0, 30, 10), 1)],  # the last one is missed
    ]
    preds = [
        [(rect(3, 3, 22, 21), 0.9, 0), (rect(25, 6, 31, 28), 0.8, 1), (rect(0, 24, 8, 31), 0.85, 0)],
        [(rect(1, 2, 10, 9), 0.7, 0), (rect(16, 18, 29, 30), 0.6, 0), (rect(2, 12, 9, 20), 0.3, 1)],
    ]
    return preds, gts


def _coco_segm_map(preds: list, gts: list) -> tuple[float, float]:
    """pycocotools' segm mAP50-95 and mAP50 for the case, with RLE written by encode_rle."""
    coco_mod = pytest.importorskip("pycocotools.coco", reason="pycocotools not installed")
    cocoeval_mod = pytest.importorskip("pycocotools.cocoeval", reason="pycocotools not installed")
    images: list[dict] = []
    anns: list[dict] = []
    results: list[dict] = []
    for img_id, (p, g) in enumerate(zip(preds, gts)):
        images.append({"id": img_id, "height": H, "width": W, "file_name": f"{img_id}.jpg"})
        for m, c in g:
            x1, y1, x2, y2 = box_of(m)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c, "iscrowd": 0, "area": float(m.sum()),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": encode_rle(m.numpy())})
        results += [{"image_id": img_id, "category_id": c, "score": s, "segmentation": encode_rle(m.numpy())} for m, s, c in p]
    gt = coco_mod.COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in enumerate(NAMES[:2])]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        e = cocoeval_mod.COCOeval(gt, dt, "segm")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0]), float(e.stats[1])


def test_mask_map_agrees_with_pycocotools() -> None:
    preds, gts = _coco_case()
    ious = [mask_iou(pm.reshape(1, -1), gm.reshape(1, -1)).item() for p, g in zip(preds, gts) for pm, _, _ in p for gm, _ in g]
    thresholds = np.linspace(0.5, 0.95, 10)
    assert all(np.abs(thresholds - v).min() > 0.005 for v in ious)  # no IoU sits on a threshold
    coco_map, coco_map50 = _coco_segm_map(preds, gts)
    r = evaluate([image(p, g) for p, g in zip(preds, gts)], nc=2)
    assert 0 < coco_map < coco_map50 < 1
    assert r.mask.map == pytest.approx(coco_map, abs=0.01) and r.mask.map50 == pytest.approx(coco_map50, abs=0.01)


# ---- results.csv ------------------------------------------------------------------------------------------------------

SEG_HEADER = [
    "epoch", "train/box_loss", "train/seg_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP_0.5(B)", "metrics/mAP_0.5:0.95(B)",
    "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP_0.5(M)", "metrics/mAP_0.5:0.95(M)",
    "val/box_loss", "val/seg_loss", "val/obj_loss", "val/cls_loss", "x/lr0", "x/lr1", "x/lr2",
]


def test_results_csv_segmentation_columns(tmp_path: Path) -> None:
    from utils.tasks import get_task

    seg = get_task("segment").metric_columns
    assert list(columns(YOLOV5_SEG_LOSSES, seg)) == SEG_HEADER
    assert columns() == COLUMNS and COLUMNS[4:8] == ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
    csv = tmp_path / "results.csv"
    for epoch in range(3):
        append_results(csv, epoch, [0.1, 0.2, 0.3, 0.4], [0.5] * 12, [0.01] * 3, YOLOV5_SEG_LOSSES, seg)
    lines = csv.read_text().splitlines()
    assert [c.strip() for c in lines[0].split(",")] == SEG_HEADER and len(lines) == 4
    with pytest.raises(ValueError, match="expected 20"):
        append_results(csv, 3, [0.1, 0.2, 0.3, 0.4], [0.5] * 8, [0.01] * 3, YOLOV5_SEG_LOSSES, seg)
    truncate_results(csv, 1, YOLOV5_SEG_LOSSES, seg)
    assert len(csv.read_text().splitlines()) == 3
