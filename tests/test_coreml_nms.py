"""Core ML --nms (utils/export/coreml.py): the detector + NonMaximumSuppression pipeline that iOS Vision reads.

What Linux can check: the saved pipeline's spec (two models wired output to input, the feature names, types and shapes
Core ML's pipeline validator compares, the NMS thresholds, class labels and box cap), the metadata, the refusals, and
the numbers of the part that runs in PyTorch: the module that is converted gives the model's decoded boxes and scores,
and Core ML's documented NMS (PickTop) modelled with torchvision on those gives detect.py's detections. The converted
pipeline's own predictions need the Core ML runtime (macOS): that test skips here and has not been run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from test_end2end import assert_same_rows
from test_export import make_checkpoint

from models.heads.base import head_class
from tests.conftest import random_images
from utils.checkpoint import load_model
from utils.export.end2end import NMSSettings
from utils.export.formats import ExportError, export_metadata
from utils.nms import non_max_suppression
from utils.runtime.coreml import coreml_can_predict, coreml_metadata

coreml = pytest.importorskip("utils.export.coreml")
SIZE = (64, 96)  # (h, w): not square, so a swapped width and height shows
EPS = float(torch.finfo(torch.float32).eps)
# One pipeline per head. The checkpoints are untrained (best class scores of 2e-4 to 2e-2), hence the low thresholds:
# anchor-based, per class, ~80 candidates and ~58 after NMS, so the top-k cap binds; anchor-free, agnostic, ~29 -> ~4.
CASES = {"yolov5n.yaml": NMSSettings(0.001, 0.45, 60, 40, False), "yolov8n.yaml": NMSSettings(0.001, 0.6, 30, 30, True)}



@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ct: Any) -> dict:
    """export.py --include coreml --nms on a 3-class checkpoint (export_model, the engine behind export.py)."""
    from utils.export.exporter import export_model

    cfg, s = request.param, CASES[request.param]
    ckpt = make_checkpoint(tmp_path_factory.mktemp("coreml_nms") / "best.pt", cfg)
    flags = asdict(s)  # --conf-thres, --iou-thres, --topk-per-class, --topk-all and --agnostic-nms
    flags["agnostic_nms"] = flags.pop("agnostic")
    (path,) = export_model(weights=ckpt, include=["coreml"], imgsz=list(SIZE), nms=True, **flags)
    model = load_model(ckpt).fuse()
    return {"path": path, "spec": ct.utils.load_spec(str(path)), "model": model, "settings": s, "ckpt": ckpt}


def _n_boxes(model: torch.nn.Module) -> int:
    """How many boxes the fused model predicts at SIZE (the rows of raw_confidence)."""
    with torch.no_grad():
        boxes, _, _ = head_class(str(model.head_kind)).split_output(model(torch.zeros(1, 3, *SIZE))[0])
    return boxes.shape[1]


def test_spec_is_a_pipeline_of_detector_and_nms(exported: dict, ct: Any) -> None:
    """Image input of the export size plus the optional threshold overrides; outputs confidence (M, nc), coordinates (M, 4)."""
    spec, s = exported["spec"], exported["settings"]
    assert spec.WhichOneof("Type") == "pipeline"
    detector, nms = spec.pipeline.models
    assert (detector.WhichOneof("Type"), nms.WhichOneof("Type")) == ("mlProgram", "nonMaximumSuppression")
    image, iou, conf = spec.description.input
    assert image.name == "images" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.height, image.type.imageType.width) == SIZE
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    for feature, name in ((iou, "iouThreshold"), (conf, "confidenceThreshold")):
        assert feature.name == name and feature.type.WhichOneof("Type") == "doubleType" and feature.type.isOptional
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    for feature, (name, width) in zip(spec.description.output, (("confidence", 3), ("coordinates", 4))):
        array = feature.type.multiArrayType
        assert feature.name == name and array.dataType == float32 and not array.shape
        bounds = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
        assert bounds == [(0, s.topk_all), (width, width)]  # at most topk_all boxes, each nc scores or 4 coordinates
    assert len(spec.description.output) == 2


def test_nms_model_holds_the_flags_and_class_names(exported: dict) -> None:
    nms, s = exported["spec"].pipeline.models[1].nonMaximumSuppression, exported["settings"]
    assert (nms.iouThreshold, nms.confidenceThreshold) == (s.iou_thres, s.conf_thres)  # doubles: exact
    assert nms.WhichOneof("SuppressionMethod") == "pickTop" and nms.pickTop.perClass is (not s.agnostic)
    assert list(nms.stringClassLabels.vector) == ["a", "b", "c"]  # the checkpoint's names
    assert (nms.confidenceInputFeatureName, nms.coordinatesInputFeatureName) == ("raw_confidence", "raw_coordinates")
    assert (nms.confidenceOutputFeatureName, nms.coordinatesOutputFeatureName) == ("confidence", "coordinates")
    assert (nms.iouThresholdInputFeatureName, nms.confidenceThresholdInputFeatureName) == ("iouThreshold", "confidenceThreshold")


def test_detector_outputs_are_wired_to_the_nms_inputs(exported: dict, ct: Any) -> None:
    """The rules Core ML's pipeline validator applies (it cannot run here): every model input is a pipeline input or an
    earlier output of the same type and shape, and the pipeline's outputs are the NMS model's."""
    spec = exported["spec"]
    detector, nms = spec.pipeline.models
    (image,) = detector.description.input
    assert image.name == spec.description.input[0].name and image.type == spec.description.input[0].type
    n = _n_boxes(exported["model"])
    raw = {f.name: f for f in detector.description.output}
    assert {k: list(f.type.multiArrayType.shape) for k, f in raw.items()} == {"raw_confidence": [n, 3], "raw_coordinates": [n, 4]}
    assert all(f.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32 for f in raw.values())
    ins = {f.name: f for f in nms.description.input}
    assert set(ins) == {*raw, "iouThreshold", "confidenceThreshold"}
    assert all(ins[k] == raw[k] for k in raw)  # identical descriptions: name, element type and shape
    assert all(ins[f.name].type == f.type for f in spec.description.input[1:])  # the optional Double overrides
    assert [(f.name, f.type) for f in nms.description.output] == [(f.name, f.type) for f in spec.description.output]
    assert nms.specificationVersion >= 5 and spec.specificationVersion >= max(detector.specificationVersion, 5)  # FLOAT32 NMS: iOS 14+


def test_metadata_names_the_settings_and_reexport_replaces_it(exported: dict, ct: Any) -> None:
    meta = coreml_metadata(exported["path"])
    s = exported["settings"]
    assert meta["names"] == ["a", "b", "c"] and meta["imgsz"] == list(SIZE) and meta["nms"] == asdict(s)
    assert meta["head"] == exported["model"].head_kind and meta["half"] is False and meta["int8"] is False
    assert coreml.is_coreml_export(exported["path"])  # so export.py may replace it


def _decoded(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own decoded output read by its documented layout: (N, 4) xywh pixels and (N, nc) class scores."""
    with torch.no_grad():
        pred = model(x)[0][0]
    if model.head_kind == "anchor_based":  # (N, 5 + nc): xywh, objectness, classes
        return pred[:, :4], pred[:, 5:] * pred[:, 4:5]
    return pred[:4].T, pred[4:].T  # anchor-free (4 + nc, N): xywh, class scores


def test_converted_module_gives_normalised_xywh_and_scores(exported: dict) -> None:
    """The module that export converts, before conversion, equals the model's decoded output on calibrated inputs."""
    model = exported["model"]
    x = random_images((1, 3, *SIZE), seed=3, normalise=False)
    with torch.no_grad():
        conf, coords = coreml.NMSInputs(model, SIZE)(x)
    xywh, scores = _decoded(model, x)
    assert torch.equal(conf, scores)  # the same products of the same tensors
    h, w = SIZE
    pixels = coords * torch.tensor([w, h, w, h])
    # xywh -> xyxy (head) -> xywh -> /size -> *size: a few float32 roundings of values up to max|xywh|; SIZE is not
    # square, so dividing x by the height (or y by the width) would miss by far more
    assert (pixels - xywh).abs().max() <= 8 * EPS * float(xywh.abs().max())


def coreml_pick_top(conf: torch.Tensor, coords: torch.Tensor, s: NMSSettings) -> torch.Tensor:
    """Core ML's documented NonMaximumSuppression (PickTop) modelled with torchvision: boxes under confidenceThreshold
    dropped, the rest by descending confidence, suppression within the argmax label (perClass) or across all, at most
    topk_all rows (the output's shape bound). Works on the normalised boxes: IoU does not change when x and y are
    scaled. Returns (M, 6) rows [x1, y1, x2, y2, score, label] in the same normalised units."""
    best, label = conf.max(1)
    keep = best > s.conf_thres
    xyxy = torchvision.ops.box_convert(coords[keep], "cxcywh", "xyxy")
    score, label = best[keep], label[keep]
    if s.agnostic:
        kept = torchvision.ops.nms(xyxy, score, s.iou_thres)
    else:
        kept = torchvision.ops.batched_nms(xyxy, score, label, s.iou_thres)
    kept = kept[: s.topk_all]
    return torch.cat((xyxy[kept], score[kept, None], label[kept, None].float()), 1)


def test_reference_nms_on_the_nms_inputs_equals_detect_nms(exported: dict) -> None:
    """What the pipeline's NMS stage is documented to do, on what its detector stage computes, gives detect.py's rows."""
    model, s = exported["model"], exported["settings"]
    h, w = SIZE
    for seed in (5, 6):
        x = random_images((1, 3, *SIZE), seed=seed, normalise=False)
        with torch.no_grad():
            conf, coords = coreml.NMSInputs(model, SIZE)(x)
            pred = model(x)
        got = coreml_pick_top(conf, coords, s) * torch.tensor([w, h, w, h, 1, 1])
        (ref,) = non_max_suppression(pred, s.conf_thres, s.iou_thres, agnostic=s.agnostic, max_det=s.topk_all, head=model.head_kind)
        assert 0 < len(ref) < int((conf.max(1).values > s.conf_thres).sum())  # NMS (and the cap) removed boxes
        assert_same_rows(got, ref, 8 * EPS)  # boxes: float32 roundings of the coordinate changes; scores: the same values


def test_half_keeps_float32_arrays_for_the_nms(exported: dict, ct: Any, tmp_path: Path) -> None:
    """--half computes in float16 but the detector's outputs stay FLOAT32, the type the NMS model's inputs copy."""
    model, s = exported["model"], exported["settings"]
    meta = export_metadata(model, SIZE, 1, False, True)
    path = coreml.export_coreml(model, tmp_path / "half.mlpackage", SIZE, meta, half=True, nms=s)
    detector, nms = ct.utils.load_spec(str(path)).pipeline.models
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert [f.type.multiArrayType.dataType for f in detector.description.output] == [float32, float32]
    assert list(nms.description.input)[:2] == list(detector.description.output) and coreml_metadata(path)["half"] is True


def test_pipeline_predictions_match_the_reference(exported: dict, ct: Any) -> None:
    """Only where the Core ML runtime exists (macOS): the pipeline's rows are the reference NMS rows (never run here)."""
    ok, why = coreml_can_predict()
    if not ok:
        pytest.skip(why)
    from PIL import Image

    model, s = exported["model"], exported["settings"]
    pixels = (random_images((1, 3, *SIZE), seed=5, normalise=False)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mlmodel = ct.models.MLModel(str(exported["path"]), compute_units=ct.ComputeUnit.CPU_ONLY)
    y = mlmodel.predict({"images": Image.fromarray(pixels)})
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        conf, coords = coreml.NMSInputs(model, SIZE)(x)
    ref = coreml_pick_top(conf, coords, s)
    got_conf, got_coords = torch.from_numpy(np.asarray(y["confidence"])), torch.from_numpy(np.asarray(y["coordinates"]))
    got_best, got_label = got_conf.max(1)
    got = torch.cat((torchvision.ops.box_convert(got_coords, "cxcywh", "xyxy"), got_best[:, None], got_label[:, None].float()), 1)
    assert_same_rows(got.float(), ref, 1e-2)  # another runtime's float32 kernels; loose as in test_coreml.py


def test_options_coreml_cannot_express_are_refused_in_one_line(tmp_path: Path) -> None:
    """--topk-per-class below --topk-all (Core ML's NMS caps only the total) and the NMS-free end-to-end head."""
    from utils.export.exporter import export_model

    with pytest.raises(ExportError, match="--topk-per-class 10 below --topk-all 20 is not available for coreml") as e:
        export_model(
            cfg="yolov5n.yaml", include=["coreml"], imgsz=64, nms=True, topk_per_class=10, topk_all=20, output=tmp_path / "x.mlpackage"
        )
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="--nms: the end-to-end head's output is already final") as e:
        export_model(cfg="yolo26n_mobilenetv4_conv_small.yaml", include=["coreml"], imgsz=64, nms=True, output=tmp_path / "e2e.mlpackage")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_direct_call_refuses_nms_free_heads_and_non_settings(ct: Any, tmp_path: Path) -> None:
    """export_coreml itself, without exporter.py's checks: an end-to-end model or a bare nms=True is one ExportError line."""
    model = load_model(make_checkpoint(tmp_path / "e2e.pt", "yolo26n_mobilenetv4_conv_small.yaml")).fuse()
    meta = export_metadata(model, (64, 64), 1, False, False)
    with pytest.raises(ExportError, match="--nms: the end-to-end head's output is already final") as e:
        coreml.export_coreml(model, tmp_path / "e2e.mlpackage", (64, 64), meta, nms=NMSSettings())
    with pytest.raises(ExportError, match="nms takes NMSSettings") as e2:
        coreml.export_coreml(model, tmp_path / "e2e.mlpackage", (64, 64), meta, nms=True)
    assert "\n" not in str(e.value) + str(e2.value) and not (tmp_path / "e2e.mlpackage").exists()


def test_backend_refuses_the_pipeline_in_one_line(exported: dict) -> None:
    from utils.runtime.backend import DetectBackend

    with pytest.raises(ValueError, match="Core ML models run only on Apple systems") as e:
        DetectBackend(exported["path"])
    assert "\n" not in str(e.value)
