"""NMS against a brute-force reference, test-time augmentation, and val/detect on a config-built model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from models.model import DetectionModel
from models.tta import forward_augment
from tests.conftest import EPS32, rel_err, rounding_tol
from utils.boxes import xywh2xyxy
from utils.checkpoint import save_checkpoint
from utils.nms import non_max_suppression


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes, plain Python."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def brute_force_nms(pred: torch.Tensor, conf_thres: float, iou_thres: float) -> list[tuple]:
    """Greedy per-class NMS with Python loops: best class per box, highest score first."""
    rows = []
    for p in pred.tolist():
        scores = [p[4] * c for c in p[5:]]
        cls = int(np.argmax(scores))
        if p[4] > conf_thres and scores[cls] > conf_thres:
            box = xywh2xyxy(torch.tensor([p[:4]]))[0].tolist()
            rows.append((box, scores[cls], cls))
    rows.sort(key=lambda r: -r[1])
    kept: list[tuple] = []
    for box, score, cls in rows:
        if all(c != cls or _iou(box, k) <= iou_thres for k, _, c in kept):
            kept.append((box, score, cls))
    return kept


def test_nms_matches_brute_force_on_random_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        n, nc = 200, 3
        xy = torch.rand(n, 2, generator=gen) * 200
        wh = torch.rand(n, 2, generator=gen) * 60 + 5
        scores = torch.rand(n, 1 + nc, generator=gen)
        pred = torch.cat((xy, wh, scores), 1)
        ours = non_max_suppression(pred[None], conf_thres=0.3, iou_thres=0.5, max_det=1000)[0]
        ref = brute_force_nms(pred, 0.3, 0.5)
        assert len(ours) == len(ref)
        ref_t = torch.tensor([[*b, s, c] for b, s, c in ref])
        # float32 torch vs float64 Python rounded to float32: at most two roundings of values up to max|ref|
        assert torch.allclose(ours[ours[:, 4].argsort(descending=True)], ref_t, rtol=0, atol=4 * EPS32 * ref_t.abs().max().item())


def test_tta_output_in_input_pixels() -> None:
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2).eval()
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        plain = model(x)[0]
        aug, _ = forward_augment(model, x)
    assert aug.shape[-1] == plain.shape[-1] and aug.shape[1] > plain.shape[1] * 2
    # the full-size, unflipped pass comes first and is unchanged apart from its dropped P5 level
    assert rel_err(aug[:, : plain.shape[1] - 3 * 4 * 5], plain[:, : plain.shape[1] - 3 * 4 * 5]) < rounding_tol(model)
    assert aug[..., 0].min() > -160 and aug[..., 0].max() < 2 * 160


def test_detect_and_val_on_config_model(tmp_path: Path) -> None:
    import detect
    import val
    from utils.data.shapes_dataset import generate_shapes

    generate_shapes(tmp_path / "ds", n_train=4, n_val=4, seed=3)
    names = ["circle", "rectangle", "triangle"]
    data = {"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val", "names": names, "nc": 3}
    weights = save_checkpoint(tmp_path / "rand.pt", DetectionModel("yolov5n.yaml", nc=3), names=data["names"])
    results, maps, _ = val.run(data=data, weights=str(weights), imgsz=64, batch_size=2, workers=0, project=str(tmp_path), device="cpu")
    assert len(results) == 7 and maps.shape == (3,)
    out = detect.run(weights=str(weights), source=str(tmp_path / "ds/images/val"), imgsz=(64, 64), conf_thres=0.0001, project=str(tmp_path),
                     name="d", save_txt=True, save_conf=True, device="cpu")
    images = sorted(out.glob("*.jpg"))
    assert len(images) == 4 and cv2.imread(str(images[0])) is not None
    rows = [line.split() for f in (out / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    assert rows and all(len(r) == 6 and 0 <= int(r[0]) < 3 for r in rows)
