"""COCO-format ground truth / results conversion and pycocotools mAP evaluation."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

LOGGER = logging.getLogger("mobile_yolo")

_COCO91_MISSING = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids unused by the 80 detection categories


class CocoEvalError(ValueError):
    """A COCO json input could not be read or is malformed (message names the file)."""


def coco80_to_91() -> list[int]:
    """Map 80-class indices to the original COCO category ids (1..90 with gaps)."""
    return [i for i in range(1, 91) if i not in _COCO91_MISSING]


def coco_image_ids(image_paths: Sequence[Union[str, Path]]) -> list[int]:
    """Integer image ids: the file stems when all are distinct integers (COCO naming), else the list indices."""
    stems = [Path(p).stem for p in image_paths]
    if stems and all(s.isdigit() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(stems)))


def yolo_to_coco_gt(
    image_paths: Sequence[Union[str, Path]],
    labels_per_image: Sequence[np.ndarray],
    image_shapes: Sequence[tuple[int, int]],
    names: Sequence[str],
    image_ids: Sequence[int] | None = None,
) -> dict:
    """Build a COCO ground-truth dict from YOLO (n, 5) [cls, cx, cy, w, h] normalised labels and (h, w) image sizes.

    Image ids default to the list index (what predictions must then use); pass image_ids, e.g. coco_image_ids(paths), to override.
    """
    if not len(image_paths) == len(labels_per_image) == len(image_shapes):
        raise ValueError(f"yolo_to_coco_gt: {len(image_paths)} paths, {len(labels_per_image)} label arrays, {len(image_shapes)} shapes")
    ids = list(range(len(image_paths))) if image_ids is None else [int(i) for i in image_ids]
    if len(ids) != len(image_paths) or len(set(ids)) != len(ids):
        raise ValueError(f"yolo_to_coco_gt: need {len(image_paths)} distinct image ids, got {len(ids)} ({len(set(ids))} distinct)")
    images: list[dict] = []
    annotations: list[dict] = []
    for img_id, path, labels, (h, w) in zip(ids, image_paths, labels_per_image, image_shapes):
        images.append({"id": img_id, "file_name": Path(path).name, "height": int(h), "width": int(w)})
        labels = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
        for c, cx, cy, bw, bh in labels:
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": int(c),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    categories = [{"id": i, "name": str(n)} for i, n in enumerate(names)]
    return {"info": {"description": "converted from YOLO labels"}, "images": images, "annotations": annotations, "categories": categories}


def predictions_to_coco(
    detections_per_image: Sequence, image_ids: Sequence[int], class_map: Sequence[int] | None = None
) -> list[dict]:
    """Turn per-image (n, 6) [x1, y1, x2, y2, conf, cls] pixel detections into a COCO results list."""
    if len(detections_per_image) != len(image_ids):
        raise ValueError(f"predictions_to_coco: {len(detections_per_image)} detection arrays but {len(image_ids)} image ids")
    results = []
    for det, img_id in zip(detections_per_image, image_ids):
        det = det.detach().float().cpu().numpy() if isinstance(det, torch.Tensor) else np.asarray(det, dtype=np.float64)
        for x1, y1, x2, y2, conf, c in det.reshape(-1, 6):
            cat = class_map[int(c)] if class_map is not None else int(c)
            results.append({"image_id": int(img_id), "category_id": int(cat),
                            "bbox": [round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(float(conf), 5)})
    return results


def _load_json(path: Union[str, Path], what: str):
    """Read a json file, turning any failure into a one-line CocoEvalError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CocoEvalError(f"{path}: cannot read COCO {what} json ({type(e).__name__}: {e})") from None


def _require_pycocotools():
    """The pycocotools COCO and COCOeval classes, or a one-line install hint."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("pycocotools is required for COCO evaluation: pip install pycocotools") from None
    return COCO, COCOeval


def _coco_from(gt: Union[dict, str, Path], coco_cls):
    """A pycocotools COCO object from a dict or a json path."""
    data = gt if isinstance(gt, dict) else _load_json(gt, "ground-truth")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoEvalError(f"{gt if not isinstance(gt, dict) else 'ground-truth dict'}: missing '{key}' key")
    coco = coco_cls()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_coco(
    gt: Union[dict, str, Path], preds: Union[list, str, Path], image_ids: Sequence[int] | None = None, verbose: bool = False
) -> tuple[float, float]:
    """COCO bbox mAP@0.5:0.95 and mAP@0.5 via pycocotools; printing of its summary only when verbose."""
    coco_cls, cocoeval_cls = _require_pycocotools()
    coco_gt = _coco_from(gt, coco_cls)
    results = preds if isinstance(preds, list) else _load_json(preds, "predictions")
    if not isinstance(results, list):
        raise CocoEvalError(f"{preds}: predictions json must be a list of detections")
    if not results:
        LOGGER.warning("WARNING: no predictions to evaluate, COCO mAP is 0")
        return 0.0, 0.0
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        try:
            coco_dt = coco_gt.loadRes(results)
        except (AssertionError, KeyError, IndexError, TypeError) as e:
            raise CocoEvalError(f"{preds if not isinstance(preds, list) else 'predictions'}: do not match the ground truth "
                                f"(unknown image ids or malformed entries: {type(e).__name__} {e})") from None
        ev = cocoeval_cls(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = [int(i) for i in image_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    map50_95, map50 = float(ev.stats[0]), float(ev.stats[1])
    if map50_95 < 0:  # pycocotools reports -1 when there is no ground truth at all
        LOGGER.warning("WARNING: COCO evaluation found no ground-truth boxes, reporting mAP 0")
        return 0.0, 0.0
    return map50_95, map50


def evaluate_dataset_json(
    dataset: Any, names: Sequence[str], pred_json: Union[str, Path], save_dir: Union[str, Path]
) -> tuple[float, float] | None:
    """pycocotools (mAP50-95, mAP50) of a predictions json against a YOLO dataset's labels; None when pycocotools is missing."""
    shapes = [(int(h), int(w)) for h, w in dataset.img_shapes]
    gt = yolo_to_coco_gt(dataset.im_files, [lb[:, :5] for lb in dataset.labels], shapes, names)
    (Path(save_dir) / "ground_truth_coco.json").write_text(json.dumps(gt))
    try:
        map_, map50 = evaluate_coco(gt, pred_json)
    except ImportError as e:
        LOGGER.warning(f"pycocotools evaluation skipped: {e}")
        return None
    LOGGER.info(f"pycocotools: mAP50-95 {map_:.4f}, mAP50 {map50:.4f}")
    return map_, map50
