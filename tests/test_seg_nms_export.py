"""export.py --nms for segmentation models: the graph ends in NMS and returns (B, topk_all, 6 + nm) rows with each
kept box's mask coefficients, then the prototypes unchanged; segment/predict.py and segment/val.py run such files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
import torch
from test_end2end import CONF, IOU, assert_same_rows
from test_export import checkpoint_tol, make_checkpoint

from utils.checkpoint import load_model
from utils.export.end2end import End2End, NMSSettings
from utils.export.exporter import export_model
from utils.export.formats import ExportError, export_metadata
from utils.nms import END2END, non_max_suppression
from utils.runtime.backend import DetectBackend

NM, SIZE = 32, (64, 96)  # yolov5n-seg's mask coefficients per box; the test image size (h, w)
ALL: dict[str, Any] = dict(conf_thres=CONF, iou_thres=IOU, topk_per_class=300, topk_all=300)  # room for every kept row


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class yolov5n-seg checkpoint with BN calibrated, so boxes, scores and masks depend on the input."""
    return make_checkpoint(tmp_path_factory.mktemp("segnms") / "seg.pt", "yolov5n-seg.yaml")


def images(batch: int) -> torch.Tensor:
    """Seeded [0, 1] noise images at SIZE."""
    return torch.rand(batch, 3, *SIZE, generator=torch.Generator().manual_seed(0))


def reference(weights: Path, x: torch.Tensor, agnostic: bool = False, max_det: int = 300) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The plain fused .pt, then utils.nms with one class per box (segment/predict.py's setting): per-image (n, 6 + nm)
    rows and the prototypes."""
    model = load_model(weights).fuse()
    with torch.no_grad():
        det, protos, _ = model(x)
    return non_max_suppression(det, CONF, IOU, agnostic=agnostic, max_det=max_det, nm=NM), protos


def assert_same_seg_rows(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Boxes, scores and classes as assert_same_rows; each reference row's mask coefficients then equal those of its
    match (the same class, the nearest box) within `tol` of the largest reference coefficient."""
    assert got.shape[1] == ref.shape[1] == 6 + NM
    assert_same_rows(got[:, :6], ref[:, :6], tol)
    got, ref = got[got[:, 4] > 0].double(), ref.double()
    scale = float(ref[:, 6:].abs().max())
    for row in ref:
        err = (got[:, :4] - row[:4]).abs().amax(1) + torch.where(got[:, 5] == row[5], 0.0, torch.inf)
        match = got[int(err.argmin())]
        assert float((match[6:] - row[6:]).abs().max()) <= tol * scale, f"mask coefficients differ for {row[:6].tolist()}"


def assert_same_protos(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Prototypes of the same shape, equal within `tol` of their scale (assert_segmentation_parity's measure)."""
    assert got.shape == ref.shape == (ref.shape[0], NM, SIZE[0] // 4, SIZE[1] // 4)
    assert float((got.double() - ref.double()).abs().max()) <= tol * float(ref.abs().max())


def assert_seg_nms_file(path: Path, weights: Path) -> None:
    """An --nms segmentation export run through DetectBackend gives the .pt's rows, coefficients and prototypes."""
    backend = DetectBackend(path)
    assert backend.head_kind == END2END and backend.task == "segment" and backend.metadata["nms"]
    x = images(2)  # exported at batch 1: the backend runs image by image
    with torch.no_grad():
        rows, protos = backend(x)
    assert rows.shape == (2, 300, 6 + NM)
    ref, ref_protos = reference(weights, x)
    tol = checkpoint_tol(weights)
    for got, want in zip(non_max_suppression(rows, CONF, IOU, head=END2END, nm=NM), ref):
        assert_same_seg_rows(got, want, tol)
    assert_same_protos(protos, ref_protos, tol)
    assert (rows[rows[..., 4] == 0] == 0).all()  # padding rows are zero, coefficients included


@pytest.mark.parametrize("agnostic", [False, True])
def test_pytorch_end2end_carries_mask_coefficients(weights: Path, agnostic: bool) -> None:
    x = images(2)
    wrapper = End2End(load_model(weights).fuse(), NMSSettings(CONF, IOU, 300, 300, agnostic=agnostic))
    with torch.no_grad():
        rows, protos = wrapper(x)
    assert rows.shape == (2, 300, 6 + NM)
    ref, ref_protos = reference(weights, x, agnostic)
    for got, want in zip(rows, ref):
        assert_same_seg_rows(got, want, 0.0)  # the same torchvision NMS on the same tensors
    assert_same_protos(protos, ref_protos, 0.0)
    assert (rows[rows[..., 4] == 0] == 0).all()  # padding rows are zero, coefficients included


def test_topk_all_keeps_the_best_rows(weights: Path) -> None:
    x = images(1)
    wrapper = End2End(load_model(weights).fuse(), NMSSettings(CONF, IOU, topk_all=5))
    with torch.no_grad():
        rows, _ = wrapper(x)
    assert rows.shape == (1, 5, 6 + NM)
    assert_same_seg_rows(rows[0], reference(weights, x, max_det=5)[0][0], 0.0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "openvino"])
def test_export_equals_pt_through_the_backend(weights: Path, fmt: str, tmp_path: Path) -> None:
    if fmt == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install -r requirements-export.txt)")
    out = {"onnx": "seg.onnx", "torchscript": "seg.torchscript", "openvino": "seg_openvino_model"}[fmt]
    (path,) = export_model(weights=weights, include=[fmt], imgsz=list(SIZE), nms=True, output=tmp_path / out, **ALL)
    if fmt == "onnx":
        graph = onnx.load(str(path)).graph
        assert any(n.op_type == "NonMaxSuppression" for n in graph.node) and [o.name for o in graph.output] == ["output0", "output1"]
    assert_seg_nms_file(path, weights)


def test_dynamic_agnostic_onnx_equals_pt(weights: Path, tmp_path: Path) -> None:
    (path,) = export_model(weights=weights, include=["onnx"], imgsz=64, dynamic=True, nms=True, conf_thres=CONF, iou_thres=IOU,
                           topk_all=5, agnostic_nms=True, output=tmp_path / "seg.onnx")  # fmt: skip
    backend = DetectBackend(path)
    assert backend.dynamic
    x = images(2)  # another size and batch than exported
    rows, protos = backend(x)
    assert rows.shape == (2, 5, 6 + NM)
    ref, ref_protos = reference(weights, x, agnostic=True, max_det=5)
    tol = checkpoint_tol(weights)
    for got, want in zip(rows, ref):
        assert_same_seg_rows(got, want, tol)
    assert_same_protos(protos, ref_protos, tol)


def label_rows(folder: Path) -> dict[str, list[tuple[tuple[float, ...], float]]]:
    """segment/predict.py --save-txt --save-conf labels: per file, sorted (class and polygon points, confidence) rows."""
    rows = {}
    for f in sorted(folder.glob("*.txt")):
        values = [tuple(float(v) for v in line.split()) for line in f.read_text().splitlines()]
        rows[f.name] = sorted((v[:-1], v[-1]) for v in values)
    return rows


def test_segment_predict_writes_the_pt_polygons(weights: Path, tmp_path: Path) -> None:
    from segment import predict

    (path,) = export_model(weights=weights, include=["onnx"], imgsz=list(SIZE), nms=True, output=tmp_path / "seg.onnx", **ALL)
    source = tmp_path / "images"
    source.mkdir()
    for i in range(2):
        cv2.imwrite(str(source / f"im{i}.png"), (np.random.default_rng(i).random((*SIZE, 3)) * 255).astype(np.uint8))
    labels = []
    for w in (weights, path):
        run = predict.run(weights=w, source=source, imgsz=SIZE, conf_thres=CONF, iou_thres=IOU, save_txt=True, save_conf=True,
                          nosave=True, project=tmp_path, name=w.suffix[1:])  # fmt: skip
        labels.append(label_rows(run / "labels"))
    pt, e2e = labels
    assert pt.keys() == e2e.keys() and all(pt.values()), "the untrained model at a low conf finds something in each image"
    tol = checkpoint_tol(weights)
    for name in pt:
        assert [r[0] for r in e2e[name]] == [r[0] for r in pt[name]]  # classes and polygon points (mask pixels) are the same
        assert np.allclose([r[1] for r in e2e[name]], [r[1] for r in pt[name]], rtol=0, atol=tol)  # confidences up to rounding


def test_segment_val_runs_on_an_nms_export(weights: Path, tmp_path: Path) -> None:
    from segment import val as seg_val
    from tests.conftest import tiny_shapes_yaml

    data = tiny_shapes_yaml(tmp_path / "data", n_train=1, n_val=3, seed=0, polygons=True)
    (path,) = export_model(weights=weights, include=["onnx"], imgsz=64, nms=True, conf_thres=0.001, iou_thres=0.6, topk_all=300,
                           topk_per_class=300, output=tmp_path / "seg.onnx")  # fmt: skip
    row, maps, _ = seg_val.run(weights=str(path), data=str(data), imgsz=64, batch_size=2, workers=0, device="cpu", project=str(tmp_path))
    assert len(row) == 12 and all(0.0 <= v <= 1.0 for v in row[:8]) and len(maps) > 0  # box and mask metrics


def test_end2end_rows_need_their_mask_coefficient_count(weights: Path) -> None:
    rows = torch.zeros(1, 5, 6 + NM)
    with pytest.raises(ValueError, match=re.escape("an end-to-end output with nm=0 has 6 values per row, got shape (1, 5, 38)")):
        non_max_suppression(rows, CONF, IOU, head=END2END)
    assert non_max_suppression(rows, CONF, IOU, head=END2END, nm=NM)[0].shape == (0, 6 + NM)


def test_ncnn_nms_is_refused_in_one_line_before_anything_is_written(weights: Path, tmp_path: Path) -> None:
    message = "--nms is not available for ncnn with segmentation models: its in-graph NMS (the DetectionOutput layer) keeps 6 values"
    with pytest.raises(ExportError, match=re.escape(message)) as e:
        export_model(weights=weights, include=["onnx", "ncnn"], imgsz=64, nms=True, output=tmp_path / "seg.onnx")
    assert "\n" not in str(e.value) and "32 mask coefficients" in str(e.value) and not list(tmp_path.iterdir())
    from utils.export.ncnn import export_ncnn

    model = load_model(weights).fuse()
    with pytest.raises(ExportError, match=re.escape(message)):  # the writer itself refuses, before it looks for PNNX
        export_ncnn(model, tmp_path / "x_ncnn_model", (64, 64), 1, export_metadata(model, (64, 64), 1, False, False), nms=NMSSettings())
    assert not list(tmp_path.iterdir())
