"""export.py --include tflite --nms: NMS in TFLite builtin ops after the converted model (utils/export/tflite_nms.py)
gives the rows of detect.py's NMS on the .pt, in the end-to-end layout of the ONNX --nms export."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest
import torch
from test_end2end import CONF, IOU, assert_same_rows, python_nms
from test_export import checkpoint_tol, make_checkpoint
from test_seg_nms_export import assert_seg_nms_file, images

import detect
from utils.checkpoint import load_model, save_checkpoint
from utils.export.end2end import NMSSettings
from utils.export.exporter import export_model
from utils.export.formats import ExportError
from utils.export.tflite import export_tflite
from utils.nms import END2END, non_max_suppression
from utils.runtime.backend import DetectBackend
from utils.runtime.tflite import TfliteRunner

# find_spec, not import: TensorFlow in the pytest process would crash a later triton import (LLVM options clash)
CONVERTER = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "onnxslim"))
RUNTIME = importlib.util.find_spec("ai_edge_litert") is not None
needs_converter = pytest.mark.skipif(not (CONVERTER and RUNTIME), reason="needs the optional TFLite packages (requirements-export.txt)")
SIZE = (64, 96)
ALL: dict[str, Any] = dict(nms=True, conf_thres=CONF, iou_thres=IOU, topk_per_class=300, topk_all=300)  # room for every row


def spread_checkpoint(path: Path) -> Path:
    """yolov8n with the class branches' last bias zeroed: the untrained class prior (~1e-5) would leave one box above
    CONF, while scores spread over (0, 1), as a trained head's do, give NMS many overlapping boxes to choose from."""
    model = load_model(make_checkpoint(path, "yolov8n.yaml"))
    for branch in cast(Any, model.head).cv3:  # yolov8n's class branches
        torch.nn.init.zeros_(branch[-1].bias)
    return save_checkpoint(path, model, names=list(model.names))


@pytest.fixture(scope="module")
def v5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """yolov5n (anchor-based, per-class NMS) checkpoint and its float32 --nms export."""
    root = tmp_path_factory.mktemp("tflite_nms_v5")
    weights = make_checkpoint(root / "best.pt")
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=list(SIZE), **ALL)
    return weights, path


def ops(path: Path) -> list[str]:
    """The op kinds of a .tflite graph, as LiteRT reads them (delegate nodes left out)."""
    return [d["op_name"] for d in TfliteRunner(path).interpreter._get_ops_details() if d["op_name"] != "DELEGATE"]


@needs_converter
def test_per_class_rows_equal_python_nms(v5: tuple[Path, Path]) -> None:
    """The same fused fp32 model with other kernels, then the same greedy per-class NMS: rows differ by rounding only."""
    weights, path = v5
    assert path.name == "best_float32.tflite"
    kinds = ops(path)
    assert "NON_MAX_SUPPRESSION_V5" in kinds and all(k.isupper() and not k.startswith("FLEX") for k in kinds)  # builtins only
    backend = DetectBackend(path)
    assert backend.head_kind == END2END and backend.fixed_imgsz == SIZE
    assert backend.metadata["nms"] == dict(conf_thres=CONF, iou_thres=IOU, topk_per_class=300, topk_all=300, agnostic=False)
    assert backend.metadata["output_shapes"] == [[1, 300, 6]]
    x = images(3)
    out = backend(x)  # batch 3 through the batch-1 file: image by image
    assert out.shape == (3, 300, 6)
    ref = python_nms(weights, x)
    for rows, got, want in zip(out, non_max_suppression(out, CONF, IOU, head=END2END), ref):
        assert_same_rows(got, want, checkpoint_tol(weights))
        assert len(want) < 300 and (rows[len(want) :] == 0).all()  # best first, then all-zero padding rows
        assert (rows[: len(want), 4].diff() <= 0).all()


@needs_converter
def test_detect_py_gives_the_pt_labels(v5: tuple[Path, Path], tmp_path: Path) -> None:
    weights, path = v5
    image = tmp_path / "im.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((*SIZE, 3)) * 255).astype(np.uint8))
    rows = []
    for w in (path, weights):
        run = detect.run(weights=w, source=image, imgsz=SIZE, conf_thres=CONF, iou_thres=IOU, save_txt=True, save_conf=True,
                         nosave=True, project=tmp_path, name="d")  # fmt: skip
        rows.append(torch.from_numpy(np.loadtxt(run / "labels" / "im.txt", ndmin=2)))
    # label rows are class x y w h conf (normalised): reorder to the x y w h conf class layout assert_same_rows matches
    got, ref = (r[:, [1, 2, 3, 4, 5, 0]] for r in rows)
    assert_same_rows(got, ref, checkpoint_tol(weights) + 1e-6)  # + the 6-decimal rounding of the label files


@needs_converter
def test_agnostic_anchor_free_top_rows_equal_python_nms(tmp_path: Path) -> None:
    """yolov8n (anchor-free, (B, 4 + nc, N) output) with --agnostic-nms --topk-all 5: the 5 best rows of one NMS over
    all classes, which is detect.py's agnostic NMS with max_det 5."""
    weights = spread_checkpoint(tmp_path / "best.pt")
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=list(SIZE), conf_thres=CONF, iou_thres=IOU, topk_all=5,
                           nms=True, agnostic_nms=True)  # fmt: skip
    x = images(2)
    out = DetectBackend(path)(x)
    assert out.shape == (2, 5, 6)
    ref = python_nms(weights, x, agnostic=True, max_det=5)
    per_class = python_nms(weights, x, max_det=5)
    for got, want, other in zip(out, ref, per_class):
        assert len(want) == 5
        assert_same_rows(got, want, checkpoint_tol(weights))
        assert not torch.equal(want, other)  # agnostic suppression across classes matters on these images


@needs_converter
def test_segmentation_rows_carry_mask_coefficients(tmp_path: Path) -> None:
    """yolov5n-seg: (1, 300, 6 + 32) rows with each kept box's mask coefficients, then the prototypes unchanged."""
    weights = make_checkpoint(tmp_path / "seg.pt", "yolov5n-seg.yaml")
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=list(SIZE), **ALL)
    assert_seg_nms_file(path, weights)


@pytest.mark.slow  # one more conversion and a validation, ~60 s on 2 cores
@needs_converter
def test_float16_file_runs_in_val_py(tmp_path: Path) -> None:
    """--half writes best_float16.tflite with NMS inside (float16 weights); val.py scores it through DetectBackend."""
    import val
    from tests.conftest import tiny_shapes_yaml

    weights = make_checkpoint(tmp_path / "best.pt")
    data = tiny_shapes_yaml(tmp_path / "data", n_train=1, n_val=3, seed=0)
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=64, half=True, nms=True, conf_thres=0.001, iou_thres=0.6)
    assert path.name == "best_float16.tflite" and "NON_MAX_SUPPRESSION_V5" in ops(path)
    assert TfliteRunner(path).metadata["quant"] == "fp16"
    row, maps, _ = val.run(weights=str(path), data=str(data), imgsz=64, batch_size=2, workers=0, device="cpu", project=str(tmp_path))
    assert all(0.0 <= v <= 1.0 for v in row[:4]) and len(maps) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(topk_per_class=10, topk_all=20), "--topk-per-class 10 below --topk-all 20 is not available for tflite"),
        (dict(int8=True, data="data/shapes.yaml"), "--nms cannot be combined with --int8 yet"),
    ],
)
def test_nms_options_tflite_cannot_express_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=re.escape(message)) as e:
        export_model(cfg="yolov5n.yaml", include=["tflite"], imgsz=64, nms=True, output=tmp_path / "x.tflite", **kwargs)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_export_tflite_itself_refuses_before_converting(tmp_path: Path) -> None:
    """The writer checks its NMS settings before it needs the converter packages or a model."""
    from torch import nn

    with pytest.raises(ExportError, match="--topk-per-class 1 below --topk-all 100"):
        export_tflite(nn.Identity(), tmp_path / "x.tflite", SIZE, {}, "fp32", nms=NMSSettings(topk_per_class=1))
    with pytest.raises(ExportError, match="--nms cannot be combined with --int8"):
        export_tflite(nn.Identity(), tmp_path / "x.tflite", SIZE, {}, "int8", [np.zeros((3, *SIZE), np.float32)], NMSSettings())
    assert not list(tmp_path.iterdir())
