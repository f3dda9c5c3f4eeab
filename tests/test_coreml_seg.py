"""Core ML export of a segmentation model (utils/export/coreml.py): two outputs, detections with mask coefficients and
the mask prototypes, as the other formats write them.

What Linux can check: the saved spec (image input, the two outputs' names, shapes and types, metadata, fp16 and int8
weights), the refusals, and the PyTorch side: the torch.export program handed to coremltools gives the model's two
outputs on calibrated inputs. Predictions need the Core ML runtime (macOS): that test skips here and has not been run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import random_images, rounding_tol
from tests.test_export import NAMES, make_checkpoint
from utils.checkpoint import load_model
from utils.export.end2end import NMSSettings
from utils.export.formats import ExportError, ExportModel, export_metadata
from utils.runtime.coreml import coreml_can_predict, coreml_metadata

coreml = pytest.importorskip("utils.export.coreml")
SIZE = (64, 96)  # (h, w): not square, so swapped prototype axes show
NM = 32  # yolov5n-seg's mask coefficients (= prototype maps)



@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, ct: Any) -> dict:
    """export.py --include coreml on a 3-class yolov5n-seg checkpoint (export_model, the engine behind export.py)."""
    from utils.export.exporter import export_model

    root = tmp_path_factory.mktemp("coreml_seg")
    ckpt = make_checkpoint(root / "best.pt", "yolov5n-seg.yaml")
    (path,) = export_model(weights=ckpt, include=["coreml"], imgsz=list(SIZE))
    model = load_model(ckpt).fuse()
    with torch.no_grad():
        det, protos = model(torch.zeros(1, 3, *SIZE))[:2]
    return {"path": path, "spec": ct.utils.load_spec(str(path)), "model": model, "ckpt": ckpt, "root": root,
            "shapes": [tuple(det.shape), tuple(protos.shape)]}  # fmt: skip


def _main_ops(spec: Any) -> list[Any]:
    """The operations of the ML Program's main function (its one block specialisation)."""
    (block,) = spec.mlProgram.functions["main"].block_specializations.values()
    return list(block.operations)


def _n_convs(model: torch.nn.Module) -> int:
    """How many convolutions the fused model runs (Conv+BN folded: one per conv layer)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_spec_has_image_input_and_two_float32_outputs(exported: dict, ct: Any) -> None:
    """'images' (RGB, the export size), 'output0' (1, N, 5 + nc + nm) detections, 'output1' (1, nm, H/4, W/4) prototypes."""
    spec = exported["spec"]
    (image,) = spec.description.input
    assert image.name == "images" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.height, image.type.imageType.width) == SIZE
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    det, protos = exported["shapes"]
    assert det[2] == 5 + len(NAMES) + NM and protos == (1, NM, SIZE[0] // 4, SIZE[1] // 4)
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    got = [(f.name, tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in spec.description.output]
    assert got == [("output0", det, float32), ("output1", protos, float32)]
    assert "5 + nc + nm" in spec.description.output[0].shortDescription and "prototypes" in spec.description.output[1].shortDescription


def test_metadata_names_the_segmentation_head(exported: dict) -> None:
    """What segment/predict.py's backend reads: names, stride, imgsz, head and task (it dispatches on the task)."""
    meta = coreml_metadata(exported["path"])
    model = exported["model"]
    assert meta["names"] == NAMES and meta["imgsz"] == list(SIZE) and meta["stride"] == int(model.stride.max())
    assert meta["head"] == "segment" and meta["task"] == "segment" and meta["half"] is False and meta["int8"] is False
    assert coreml.is_coreml_export(exported["path"])  # so a re-export may replace it


def test_converted_program_gives_both_outputs(exported: dict) -> None:
    """The torch.export program that coremltools converts gives the model's detections and prototypes on calibrated
    inputs, within float32 rounding of each output's scale."""
    model = exported["model"]
    program = coreml.export_program(ExportModel(model), torch.zeros(1, 3, *SIZE))
    tol = rounding_tol(model)
    for seed in (1, 2):
        x = random_images((1, 3, *SIZE), seed=seed, normalise=False)
        with torch.no_grad():
            got, ref = program.module()(x), model(x)[:2]
        assert len(got) == 2
        for g, r in zip(got, ref):
            assert g.shape == r.shape and float((g - r).abs().max()) <= tol * float(r.abs().max())


@pytest.mark.parametrize("kw", [{"half": True}, {"int8": True}])
def test_half_and_int8_weights_keep_float32_outputs(exported: dict, ct: Any, kw: dict) -> None:
    """--half stores fp16 conv weights, int8 (weights only) int8 ones dequantised at load; the two outputs stay FLOAT32."""
    model = exported["model"]
    meta = export_metadata(model, SIZE, 1, False, bool(kw.get("half")))
    path = coreml.export_coreml(model, exported["root"] / f"{next(iter(kw))}.mlpackage", SIZE, meta, **kw)
    spec = ct.utils.load_spec(str(path))
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert [(f.name, f.type.multiArrayType.dataType) for f in spec.description.output] == [("output0", float32), ("output1", float32)]
    ops = _main_ops(spec)
    dtype = {o.outputs[0].name: o.outputs[0].type.tensorType.dataType for o in ops if o.outputs}
    weights = [dtype[o.inputs["weight"].arguments[0].name] for o in ops if o.type == "conv"]
    mil = ct.proto.MIL_pb2.DataType
    assert len(weights) == _n_convs(model)  # every conv of the fused model, once
    if kw.get("half"):
        assert set(weights) == {mil.Value("FLOAT16")}
    else:  # conv weights of more than 2048 values (coremltools' default weight_threshold) are int8, dequantised at load
        quantised = {o.outputs[0].name: o.attributes["quantized_data"].type.tensorType.dataType for o in ops
                     if o.type == "constexpr_affine_dequantize"}  # fmt: skip
        assert set(weights) == {mil.Value("FLOAT32")} and set(quantised.values()) == {mil.Value("INT8")}
        n_int8 = sum(o.inputs["weight"].arguments[0].name in quantised for o in ops if o.type == "conv")
        big = sum(m.weight.numel() > 2048 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert n_int8 == big > len(weights) // 2
    meta_back = coreml_metadata(path)
    assert (meta_back["half"], meta_back["int8"], meta_back["head"]) == (bool(kw.get("half")), bool(kw.get("int8")), "segment")


def test_nms_is_refused_in_one_line(exported: dict) -> None:
    """Core ML's NonMaximumSuppression model does not say which rows it kept, so mask coefficients cannot follow their
    boxes: export.py --nms and a direct call refuse before writing anything."""
    from utils.export.exporter import export_model

    out = exported["root"] / "nms.mlpackage"
    with pytest.raises(ExportError, match="--nms is not available for coreml with segmentation models") as e:
        export_model(weights=exported["ckpt"], include=["coreml"], imgsz=list(SIZE), nms=True, output=out)
    meta = export_metadata(exported["model"], SIZE, 1, False, False)
    with pytest.raises(ExportError, match="not which rows it kept, so the 32 mask coefficients") as e2:
        coreml.export_coreml(exported["model"], out, SIZE, meta, nms=NMSSettings())
    assert "\n" not in str(e.value) + str(e2.value) and not out.exists()


def test_backend_refuses_the_package_in_one_line(exported: dict) -> None:
    from utils.runtime.backend import DetectBackend

    with pytest.raises(ValueError, match="Core ML models run only on Apple systems") as e:
        DetectBackend(exported["path"])
    assert "\n" not in str(e.value)


def test_predictions_match_pytorch(exported: dict, ct: Any) -> None:
    """Only where the Core ML runtime exists (macOS): both outputs close to PyTorch (never run here)."""
    ok, why = coreml_can_predict()
    if not ok:
        pytest.skip(why)
    from PIL import Image

    pixels = (random_images((1, 3, *SIZE), seed=1, normalise=False)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mlmodel = ct.models.MLModel(str(exported["path"]), compute_units=ct.ComputeUnit.CPU_ONLY)
    y = mlmodel.predict({"images": Image.fromarray(pixels)})
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = exported["model"](x)[:2]
    for name, r in zip(("output0", "output1"), ref):
        got = np.asarray(y[name])
        assert got.shape == tuple(r.shape) and np.abs(got - r.numpy()).max() < 1e-2 * max(1.0, float(r.abs().max()))  # as test_coreml.py


def test_prototype_branch_converts_to_core_ml_layers(exported: dict) -> None:
    """Every conv of the fused model is a Core ML conv, and the prototypes' x2 upsample Core ML's own nearest upsample
    (one in Proto, two in the neck)."""
    ops = Counter(o.type for o in _main_ops(exported["spec"]))
    assert ops["conv"] == _n_convs(exported["model"]) and ops["upsample_nearest_neighbor"] == 3
