"""export.py --nms: NMS inside the exported graph gives the same final boxes as the Python NMS on the plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import checkpoint_tol, make_checkpoint

import detect
from utils.checkpoint import load_model
from utils.export.end2end import End2End, NMSSettings
from utils.export.exporter import export_model
from utils.export.formats import ExportError
from utils.nms import END2END, non_max_suppression
from utils.runtime.backend import DetectBackend

CONF, IOU = 0.005, 0.5  # the test checkpoints are untrained: their scores sit near 0.01


@pytest.fixture(scope="module", params=["yolov5n.yaml", "yolov8n.yaml"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class checkpoint with the anchor-based and with the anchor-free head."""
    return make_checkpoint(tmp_path_factory.mktemp("e2e") / "best.pt", request.param)


def python_nms(weights: Path, x: torch.Tensor, agnostic: bool = False, max_det: int = 300) -> list[torch.Tensor]:
    """The reference: the plain fused model, then utils.nms with one class per box (detect.py's setting)."""
    model = load_model(weights).fuse()
    with torch.no_grad():
        pred = model(x)
    return non_max_suppression(pred, CONF, IOU, agnostic=agnostic, max_det=max_det, head=model.head_kind)


def assert_same_rows(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """The same detections in any order: each reference row has its own match of the same class within the tolerance.

    Rows are matched rather than sorted because two scores equal up to rounding may swap places between implementations.
    Boxes are compared within `tol` of the largest coordinate and scores within `tol` (see assert_close_predictions).
    """
    got, ref = got[got[:, 4] > 0].double(), ref[ref[:, 4] > 0].double()
    assert got.shape == ref.shape and len(ref) > 0
    box_tol = tol * float(ref[:, :4].abs().max())
    free = torch.ones(len(got), dtype=torch.bool)
    for row in ref:
        err = (got[:, :4] - row[:4]).abs().amax(1)
        ok = free & (got[:, 5] == row[5]) & ((got[:, 4] - row[4]).abs() <= tol) & (err <= box_tol)
        assert ok.any(), f"no match for {row.tolist()}"
        j = int(torch.where(ok, err, torch.inf).argmin())
        free[j] = False


@pytest.mark.parametrize("agnostic", [False, True])
def test_pytorch_end2end_equals_python_nms(checkpoint: Path, agnostic: bool) -> None:
    x = torch.rand(2, 3, 96, 128)
    wrapper = End2End(load_model(checkpoint).fuse(), NMSSettings(CONF, IOU, topk_per_class=300, topk_all=300, agnostic=agnostic))
    with torch.no_grad():
        out = wrapper(x)
    assert out.shape == (2, 300, 6)
    for got, ref in zip(out, python_nms(checkpoint, x, agnostic)):
        assert_same_rows(got, ref, 0.0)  # the same torchvision NMS on the same tensors


def test_topk_all_keeps_the_best_rows_and_zero_pads(checkpoint: Path) -> None:
    x = torch.rand(1, 3, 64, 96)
    wrapper = End2End(load_model(checkpoint).fuse(), NMSSettings(CONF, IOU, topk_all=5))
    with torch.no_grad():
        out = wrapper(x)[0]
        few = End2End(load_model(checkpoint).fuse(), NMSSettings(0.999, IOU, topk_all=5))(x)[0]
    assert_same_rows(out, python_nms(checkpoint, x, max_det=5)[0], 0.0)
    assert (few == 0).all()  # nothing above 0.999: every row is padding


def test_onnx_end2end_matches_python_nms_at_any_batch_and_size(checkpoint: Path, tmp_path: Path) -> None:
    (path,) = export_model(weights=checkpoint, include=["onnx"], imgsz=64, dynamic=True, nms=True, conf_thres=CONF,
                           iou_thres=IOU, topk_per_class=300, topk_all=300, output=tmp_path / "e2e.onnx")
    assert any(n.op_type == "NonMaxSuppression" for n in onnx.load(str(path)).graph.node)
    backend = DetectBackend(path)
    assert backend.head_kind == END2END and backend.dynamic
    x = torch.rand(2, 3, 96, 128)
    out = backend(x)
    assert out.shape == (2, 300, 6)
    final = non_max_suppression(out, CONF, IOU, head=backend.head_kind)
    for got, ref in zip(final, python_nms(checkpoint, x)):
        assert_same_rows(got, ref, checkpoint_tol(checkpoint))


def test_torchscript_end2end_and_detect_py(checkpoint: Path, tmp_path: Path) -> None:
    kwargs = dict(weights=checkpoint, imgsz=[64, 96], nms=True, conf_thres=CONF, iou_thres=IOU, topk_per_class=300, topk_all=300)
    (ts,) = export_model(include=["torchscript"], output=tmp_path / "e2e.torchscript", **kwargs)
    backend = DetectBackend(ts)
    assert backend.head_kind == END2END and backend.fixed_imgsz == (64, 96)
    x = torch.rand(3, 3, 64, 96)
    with torch.no_grad():
        out = backend(x)  # exported at batch 1: run image by image
    for got, ref in zip(non_max_suppression(out, CONF, IOU, head=END2END), python_nms(checkpoint, x)):
        assert_same_rows(got, ref, checkpoint_tol(checkpoint))
    image = tmp_path / "im.png"
    import cv2

    cv2.imwrite(str(image), (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    (plain,) = export_model(weights=checkpoint, include=["torchscript"], imgsz=[64, 96], output=tmp_path / "plain.torchscript")
    rows = []
    for w in (ts, plain):
        run = detect.run(weights=w, source=image, imgsz=(64, 96), conf_thres=CONF, iou_thres=IOU, save_txt=True, save_conf=True,
                         nosave=True, project=tmp_path, name="d")
        rows.append(sorted(map(tuple, np.loadtxt(run / "labels" / "im.txt", ndmin=2).round(4).tolist())))
    assert rows[0] == rows[1] and rows[0]  # detect.py gives the same labels with NMS in or out of the graph


def test_openvino_end2end(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is optional (pip install openvino)")
    (path,) = export_model(weights=checkpoint, include=["openvino"], imgsz=64, nms=True, conf_thres=CONF, iou_thres=IOU,
                           topk_per_class=300, topk_all=300, output=tmp_path / "e2e_openvino_model")
    backend = DetectBackend(path)
    x = torch.rand(1, 3, 64, 64)
    assert backend.head_kind == END2END
    got = non_max_suppression(backend(x), CONF, IOU, head=END2END)[0]
    assert_same_rows(got, python_nms(checkpoint, x)[0], checkpoint_tol(checkpoint))  # f32 kernels: rounding only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(int8=True, data="data/shapes.yaml"), "--nms cannot be combined with --int8"),
        (dict(topk_all=0), "--topk-all must be an integer >= 1"),
        (dict(iou_thres=1.5), "--iou-thres must be between 0 and 1"),
    ],
)
def test_bad_nms_options_are_one_line(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises((ExportError, ValueError), match=message):
        export_model(cfg="yolov5n.yaml", include=["onnx"], imgsz=64, nms=True, output=tmp_path / "x.onnx", **kwargs)
    assert not list(tmp_path.iterdir())
