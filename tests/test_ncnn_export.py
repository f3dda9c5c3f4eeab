"""NCNN export beyond plain detectors: --nms in the graph (ncnn's DetectionOutput layer), segmentation models, and the
RT-DETR refusal, each checked against the .pt model (parity within the float32 rounding tolerance of tests/conftest.py)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("ncnn", reason="NCNN runtime tests need the ncnn package (pip install ncnn)")
pytest.importorskip("pnnx", reason="NCNN export tests need the pnnx converter (pip install pnnx)")

from test_end2end import CONF, IOU, assert_same_rows, python_nms  # noqa: E402
from test_export import assert_segmentation_parity, checkpoint_tol, make_checkpoint  # noqa: E402
from test_rtdetr import TINY  # noqa: E402

import detect  # noqa: E402
from tests.conftest import random_images  # noqa: E402
from utils.export.exporter import export_model  # noqa: E402
from utils.export.formats import ExportError, export_metadata  # noqa: E402
from utils.export.ncnn import export_ncnn  # noqa: E402
from utils.nms import END2END, non_max_suppression  # noqa: E402
from utils.runtime.backend import DetectBackend  # noqa: E402
from utils.runtime.ncnn import NMS_LAYER, PARAM_FILE, read_param  # noqa: E402

SIZE = (64, 96)
NMS = dict(nms=True, conf_thres=CONF, iou_thres=IOU, topk_per_class=300, topk_all=300)


@pytest.fixture(scope="module", params=["yolov5n.yaml", "yolov8n.yaml"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BN-calibrated 3-class checkpoint with the anchor-based and with the anchor-free head."""
    return make_checkpoint(tmp_path_factory.mktemp("ncnn_e2e") / "best.pt", request.param)


def test_nms_in_graph_matches_python_nms(checkpoint: Path, tmp_path: Path) -> None:
    (folder,) = export_model(weights=checkpoint, include=["ncnn"], imgsz=list(SIZE), output=tmp_path / "e2e_ncnn_model", **NMS)
    layers, _, _ = read_param(folder / PARAM_FILE)
    assert layers[-1][0] == NMS_LAYER and all("." not in kind for kind, _, _ in layers)  # NMS is an ncnn layer, in the graph
    backend = DetectBackend(folder)
    assert backend.head_kind == END2END and backend.fixed_imgsz == SIZE
    x = random_images((3, 3, *SIZE), seed=0, normalise=False)
    out = backend(x)  # batch 3 of a batch-1 graph: image by image
    assert out.shape == (3, 300, 6)
    # the same fused fp32 graph with other kernels, then the same greedy per-class NMS: boxes and scores differ by rounding
    for got, ref in zip(non_max_suppression(out, CONF, IOU, head=END2END), python_nms(checkpoint, x)):
        assert_same_rows(got, ref, checkpoint_tol(checkpoint))


def test_nms_topk_all_and_an_image_without_detections(tmp_path: Path) -> None:
    weights = make_checkpoint(tmp_path / "best.pt")
    kwargs = dict(weights=weights, include=["ncnn"], imgsz=list(SIZE), iou_thres=IOU, nms=True)
    (top5,) = export_model(output=tmp_path / "top5_ncnn_model", conf_thres=CONF, topk_all=5, **kwargs)
    (none,) = export_model(output=tmp_path / "none_ncnn_model", conf_thres=0.999, **kwargs)
    x = random_images((1, 3, *SIZE), seed=1, normalise=False)
    assert_same_rows(DetectBackend(top5)(x)[0], python_nms(weights, x, max_det=5)[0], checkpoint_tol(weights))
    empty = DetectBackend(none)(x)
    assert empty.shape == (1, 100, 6) and (empty == 0).all()  # nothing above 0.999: every row is padding


def test_detect_py_gives_the_pt_labels(tmp_path: Path) -> None:
    weights = make_checkpoint(tmp_path / "best.pt")
    (folder,) = export_model(weights=weights, include=["ncnn"], imgsz=list(SIZE), output=tmp_path / "e2e_ncnn_model", **NMS)
    image = tmp_path / "im.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((*SIZE, 3)) * 255).astype(np.uint8))
    rows = []
    for w in (folder, weights):
        run = detect.run(weights=w, source=image, imgsz=SIZE, conf_thres=CONF, iou_thres=IOU, save_txt=True, save_conf=True,
                         nosave=True, project=tmp_path, name="d")
        rows.append(torch.from_numpy(np.loadtxt(run / "labels" / "im.txt", ndmin=2)))
    # label rows are class x y w h conf (normalised): reorder to the x y w h conf class layout assert_same_rows matches
    got, ref = (r[:, [1, 2, 3, 4, 5, 0]] for r in rows)
    assert_same_rows(got, ref, checkpoint_tol(weights) + 1e-6)  # + the 6-decimal rounding of the label files


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(agnostic_nms=True), "--agnostic-nms is not available for ncnn: its in-graph NMS (the DetectionOutput layer)"),
        (dict(topk_per_class=10, topk_all=20), "--topk-per-class 10 below --topk-all 20 is not available for ncnn"),
    ],
)
def test_nms_options_ncnn_cannot_express_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=re.escape(message)) as e:
        export_model(cfg="yolov5n.yaml", include=["ncnn"], imgsz=64, nms=True, output=tmp_path / "x_ncnn_model", **kwargs)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_segmentation_matches_pt(tmp_path: Path) -> None:
    weights = make_checkpoint(tmp_path / "best.pt", "yolov5n-seg.yaml")
    (folder,) = export_model(weights=weights, include=["ncnn"], imgsz=list(SIZE), output=tmp_path / "best_ncnn_model")
    ncnn_backend = DetectBackend(folder)
    assert ncnn_backend.task == "segment" and ncnn_backend.fixed_imgsz == SIZE
    assert_segmentation_parity(ncnn_backend, weights, SIZE)
    image = tmp_path / "im.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((*SIZE, 3)) * 255).astype(np.uint8))
    from segment import predict

    run = predict.run(weights=folder, source=image, imgsz=SIZE, conf_thres=CONF, save_txt=True, nosave=True, project=tmp_path)
    assert (run / "labels" / "im.txt").is_file()  # segment/predict.py runs the NCNN folder end to end


def test_rtdetr_is_refused_naming_the_blocking_op(tmp_path: Path) -> None:
    cfg = tmp_path / "rtdetr_tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ExportError, match=r"RT-DETR models cannot export to ncnn: its query selection \(torch.topk") as e:
        export_model(cfg=str(cfg), include=["ncnn"], imgsz=64, output=tmp_path / "rt_ncnn_model")
    assert "\n" not in str(e.value)


def test_rtdetr_refusal_is_what_pnnx_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converter itself: grid_sample converts, torch.topk stays a torch op (if ncnn gains TopK, revisit the refusal)."""
    from models.model import DetectionModel
    from utils.export import ncnn as ncnn_export

    torch.manual_seed(0)
    model = DetectionModel(TINY).eval().fuse()
    seen: list[str] = []
    checker = ncnn_export._check_layers

    def record(param: Path) -> None:
        seen.extend(kind for kind, _, _ in read_param(param)[0])
        checker(param)

    monkeypatch.setattr(ncnn_export, "_check_layers", record)
    with pytest.raises(ExportError, match="PNNX left ops NCNN cannot run: .*torch.topk"):
        export_ncnn(model, tmp_path / "rt_ncnn_model", (64, 64), 1, export_metadata(model, (64, 64), 1, False, False))
    assert "GridSample" in seen
