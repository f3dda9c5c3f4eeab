"""TFLite export of the top-k heads: the onnx2tf rewrites (utils/export/onnx2tf_fixes.py) keep the ONNX model's output, and
the end-to-end head's float32 / float16 .tflite agrees with the .pt through DetectBackend and detect.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_format_matrix import NAMES, SIZE, output_errors, trained_like

from tests.conftest import final_rows_error, random_images, rounding_tol
from utils.checkpoint import save_checkpoint
from utils.export.exporter import export_model
from utils.export.formats import export_metadata, export_onnx_model
from utils.export.onnx2tf_fixes import prepare_for_onnx2tf
from utils.export.tflite import _normalize_boxes_onnx
from utils.runtime.backend import DetectBackend
from utils.runtime.tflite import box_channel_axis

# find_spec, not import: TensorFlow in the pytest process would crash a later triton import (LLVM options clash)
TFLITE = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "onnxslim", "ai_edge_litert"))
needs_tflite = pytest.mark.skipif(not TFLITE, reason="needs the optional TFLite packages (requirements-export.txt)")
END2END = "yolo26n_mobilenetv4_conv_small.yaml"


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize(("cfg", "batch", "fixes"), [(END2END, 1, ["end2end_tail", "topk_k"]), (END2END, 2, ["end2end_tail", "topk_k"]),
                                                     ("rtdetr_csp_small.yaml", 1, ["topk_k"])])  # fmt: skip
def test_rewrite_keeps_the_onnx_output(cfg: str, batch: int, fixes: list[str], tmp_path: Path) -> None:
    """The rewritten model is valid ONNX (full check, shape inference included) and ONNX Runtime gives the same output
    bit for bit: the rebuilt tail runs the same float ops (gathers and top-k, no new arithmetic on scores or boxes)."""
    model = trained_like(cfg).fuse().eval()
    meta = export_metadata(model, SIZE, batch, False, False)
    raw = export_onnx_model(model, tmp_path / "raw.onnx", SIZE, batch_size=batch, metadata=meta)
    src = tmp_path / "m.onnx"
    _normalize_boxes_onnx(raw, src, SIZE, box_channel_axis(meta))  # what export_tflite hands to the rewrite: slimmed, boxes in [0, 1]
    original = src.read_bytes()
    assert prepare_for_onnx2tf(src, tmp_path / "fixed.onnx") == fixes
    assert src.read_bytes() == original  # the user's .onnx is never touched
    fixed = onnx.load(str(tmp_path / "fixed.onnx"))
    onnx.checker.check_model(fixed, full_check=True)
    inits = {i.name for i in fixed.graph.initializer}
    assert all(n.input[1] not in inits for n in fixed.graph.node if n.op_type == "TopK")  # K computed, as onnx2tf needs
    if "end2end_tail" in fixes:  # the ops onnx2tf mis-lays-out are gone
        assert not {n.op_type for n in fixed.graph.node} & {"GatherElements", "Expand"}
    x = random_images((batch, 3, *SIZE), seed=3, normalise=False).numpy()
    np.testing.assert_array_equal(_ort(tmp_path / "fixed.onnx", x), _ort(src, x))


def test_rewrite_leaves_other_heads_alone(tmp_path: Path) -> None:
    model = trained_like("yolov8n.yaml").fuse().eval()
    meta = export_metadata(model, SIZE, 1, False, False)
    src = tmp_path / "m.onnx"
    _normalize_boxes_onnx(export_onnx_model(model, tmp_path / "raw.onnx", SIZE, metadata=meta), src, SIZE, box_channel_axis(meta))
    assert prepare_for_onnx2tf(src, tmp_path / "same.onnx") == []
    assert onnx.load(str(tmp_path / "same.onnx")).graph == onnx.load(str(src)).graph


@pytest.fixture(scope="module")
def end2end_tflite(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The end-to-end config's BN-calibrated checkpoint, its float32 and float16 .tflite files and the .pt's output."""
    root = tmp_path_factory.mktemp("e2e_tflite")
    model = trained_like(END2END)
    weights = save_checkpoint(root / "best.pt", model, names=NAMES)
    files = {q: export_model(weights=weights, include=["tflite"], imgsz=list(SIZE), half=q == "fp16")[0] for q in ("fp32", "fp16")}
    reference = DetectBackend(weights)
    x = random_images((1, 3, *SIZE), normalise=False)
    with torch.no_grad():
        ref = reference(x)
    return {"weights": weights, "files": files, "x": x, "ref": ref, "tol": rounding_tol(reference.model), "fused": reference.model}


@needs_tflite
def test_end2end_float32_matches_pt(end2end_tflite: dict) -> None:
    """Rows compared as a set (conftest.query_set_error): boxes in pixels (scaled back by the runner), score, and the
    class column unscaled (a class off by one is a distance of 1, far above the float32 rounding tolerance)."""
    s = end2end_tflite
    backend = DetectBackend(s["files"]["fp32"])
    with torch.no_grad():
        y = backend(s["x"])
    assert tuple(np.asarray(y).shape) == tuple(s["ref"].shape) == (1, 126, 6)  # 64x96: 126 positions < max_det 300
    errors = output_errors(y, s["ref"], "end2end", len(NAMES))
    assert errors["queries"] < s["tol"], (errors, s["tol"])
    assert set(np.asarray(y)[0, :, 5].tolist()) <= set(range(len(NAMES)))


@needs_tflite
def test_end2end_float16_within_weight_rounding(end2end_tflite: dict) -> None:
    """float16 weights: each of the L conv layers moves its output by <= eps16/2 of its scale, so eps16 * L (twice that
    sum) bounds boxes (relative) and scores; rows scored within that of the last kept one may swap (final_rows_error)."""
    s = end2end_tflite
    with torch.no_grad():
        y = torch.as_tensor(np.asarray(DetectBackend(s["files"]["fp16"])(s["x"])))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in s["fused"].modules())
    tol = torch.finfo(torch.float16).eps * layers
    assert final_rows_error(y, torch.as_tensor(np.asarray(s["ref"])), tol) < tol


@needs_tflite
def test_detect_on_end2end_tflite_writes_the_pt_labels(end2end_tflite: dict, tmp_path: Path) -> None:
    import cv2

    import detect

    image = tmp_path / "im.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((*SIZE, 3)) * 255).astype(np.uint8))
    rows = []
    for w in (end2end_tflite["weights"], end2end_tflite["files"]["fp32"]):
        run = detect.run(weights=w, source=image, imgsz=SIZE, conf_thres=0.5, save_txt=True, save_conf=True, nosave=True,
                         project=tmp_path, name="d")  # fmt: skip
        rows.append(np.loadtxt(run / "labels" / "im.txt", ndmin=2))
    got, ref = (r[np.lexsort(r.T[::-1])] for r in rows)
    assert len(ref) and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4)  # normalised xywh and conf, printed to 6 digits; classes equal


def _same_class_ious(row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """IoU of one final row's box with each of `rows` of the same class (0 for the others)."""
    lo, hi = np.maximum(row[:2], rows[:, :2]), np.minimum(row[2:4], rows[:, 2:4])
    inter = np.clip(hi - lo, 0, None).prod(1)
    iou = inter / ((row[2:4] - row[:2]).prod() + (rows[:, 2:4] - rows[:, :2]).prod(1) - inter)
    return np.where(rows[:, 5] == row[5], iou, 0.0)


@needs_tflite
def test_end2end_int8_keeps_final_rows(end2end_tflite: dict, tmp_path: Path) -> None:
    """--int8: int8 input, float32 final rows (valid classes, scores ranked, boxes ordered), and the float file's top 10
    rows found again among the INT8 file's top 20 (same class, mean IoU > 0.5; 0.74 measured on this random-weight
    model). Accuracy is measured on trained models instead: docs/export.md, INT8 on the trained study models."""
    import cv2

    from utils.runtime.tflite import TfliteRunner

    for i in range(16):  # calibration images: the same kind of random images the model's BN statistics came from
        image = random_images((3, *SIZE), seed=50 + i, normalise=False).numpy().transpose(1, 2, 0)
        cv2.imwrite(str(tmp_path / f"{i}.png"), (image * 255).astype(np.uint8))
    (path,) = export_model(weights=end2end_tflite["weights"], include=["tflite"], imgsz=list(SIZE), int8=True, data=str(tmp_path))
    runner = TfliteRunner(path)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.float32
    with torch.no_grad():
        y = np.asarray(DetectBackend(path)(end2end_tflite["x"]))[0]
        ref = np.asarray(DetectBackend(end2end_tflite["files"]["fp32"])(end2end_tflite["x"]))[0]
    assert y.shape == ref.shape and set(y[:, 5].tolist()) <= set(range(len(NAMES)))
    assert (np.diff(y[:, 4]) <= 0).all() and (y[:, 2:4] >= y[:, :2]).all()
    found = [_same_class_ious(row, y[:20]).max() for row in ref[:10]]
    assert np.mean(found) > 0.5, found
