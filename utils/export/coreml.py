"""Core ML export (.mlpackage, ML Program) of a fused DetectionModel via coremltools from a torch.export ExportedProgram.

torch.export, not torch.jit.trace: coremltools 9.0 fails on the traced aten::Int of the anchor-free head and of
MobileNetV4 attention blocks under NumPy 2 ("only 0-dimensional arrays can be converted to Python scalars").

The input is an RGB ImageType scaled by 1/255 (so Core ML feeds the [0, 1] tensor our models take); the output
'output0' is the head's decoded export layout, followed by 'output1', ... for a head with more outputs (a segmentation
model's mask prototypes); the metadata dict is stored in the model's user-defined metadata (strings; lists/dicts as
JSON). Conversion works on Linux; predictions need the Core ML runtime (macOS only). Reading that metadata back and
checking for the runtime are utils/runtime/coreml.py's. A segmentation model exports without --nms only: Core ML's
NonMaximumSuppression model does not say which rows it kept, so mask coefficients could not follow their boxes.

With NMS settings (export.py --nms) the package is a pipeline, the layout iOS Vision reads as
VNRecognizedObjectObservation: (1) the detector, whose outputs are 'raw_confidence' (N, nc) class scores and
'raw_coordinates' (N, 4) boxes as centre-x, centre-y, width, height relative to the input size, then (2) Core ML's
NonMaximumSuppression model, whose outputs are 'confidence' (M, nc) and 'coordinates' (M, 4), M <= topk_all, with the
thresholds as defaults (optional Double inputs 'iouThreshold' and 'confidenceThreshold' override them) and the class
names as its labels. Only the spec and the PyTorch half are checked here: the pipeline's predictions need macOS.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union, cast

import torch
from torch import nn

from utils.export.end2end import NMSSettings
from utils.export.formats import EXPORT_DESCRIPTION, INPUT_NAME, ExportError, ExportModel, atomic_path
from utils.runtime import coreml as runtime_coreml
from utils.runtime.coreml import coreml_metadata

RAW_CONFIDENCE, RAW_COORDINATES = "raw_confidence", "raw_coordinates"  # the detector's outputs, the NMS model's inputs
CONFIDENCE, COORDINATES = "confidence", "coordinates"  # the pipeline's outputs (the names Vision reads)
IOU_INPUT, CONF_INPUT = "iouThreshold", "confidenceThreshold"  # optional Double inputs overriding the NMS thresholds
NMS_SPEC_VERSION = 5  # Core ML 4 (iOS 14): the first whose NonMaximumSuppression takes FLOAT32 arrays, not only DOUBLE


def import_coremltools() -> Any:
    """The coremltools package, or a one-line ExportError naming the pip command."""
    return runtime_coreml.import_coremltools("Core ML export", ExportError)


def _metadata_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """Core ML user-defined metadata is str -> str: strings as they are, everything else as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


class NMSInputs(nn.Module):
    """A detector's decoded output for one image as Core ML's NonMaximumSuppression reads it: (raw_confidence (N, nc)
    class scores (anchor-based: objectness x class), raw_coordinates (N, 4) centre-x, centre-y, width, height divided
    by the input width and height)."""

    input_size: torch.Tensor  # (w, h, w, h) of the input, a buffer

    def __init__(self, model: nn.Module, imgsz: tuple[int, int]) -> None:
        super().__init__()
        self.detector = ExportModel(model)
        h, w = imgsz
        self.register_buffer("input_size", torch.tensor([w, h, w, h], dtype=torch.float32), persistent=False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores, _ = self.detector.head.split_output(self.detector(x))  # (1, N, 4) xyxy pixels, (1, N, nc)
        xy = (boxes[0, :, :2] + boxes[0, :, 2:]) / 2
        wh = boxes[0, :, 2:] - boxes[0, :, :2]
        return scores[0], torch.cat((xy, wh), 1) / self.input_size


def check_nms_model(model: nn.Module) -> None:
    """Refuse, in one line, --nms for a model whose rows carry extra values (a segmentation model's mask coefficients)."""
    head = getattr(model, "head", None)
    nm = int(getattr(head, "nm", 0))
    if nm:
        title = getattr(getattr(head, "policy", None), "title", type(head).__name__)
        raise ExportError(
            f"--nms is not available for coreml with {title} models: Core ML's NonMaximumSuppression model returns only "
            f"the kept boxes and class confidences, not which rows it kept, so the {nm} mask coefficients cannot follow "
            "their boxes; export coreml without --nms"
        )


def output_names(model: nn.Module) -> list[str]:
    """The plain export's output names: 'output0' (the head's decoded layout), then 'output1' (segmentation prototypes) ..."""
    return [f"output{i}" for i in range(len(_head_class(model).output_axes()))]


def _head_class(model: nn.Module) -> Any:
    """The class of a DetectionModel's head (its output axes and export layout)."""
    return type(cast(Any, model).head)


def check_nms(settings: NMSSettings) -> None:
    """Refuse, in one line, the --nms options Core ML's NonMaximumSuppression model cannot express."""
    if settings.topk_per_class < settings.topk_all:
        raise ExportError(
            f"--topk-per-class {settings.topk_per_class} below --topk-all {settings.topk_all} is not available for "
            "coreml: its NonMaximumSuppression model caps only the total; pass --topk-per-class >= --topk-all"
        )


def export_coreml(
    model: nn.Module,
    out: Union[str, Path],
    imgsz: tuple[int, int],
    metadata: dict[str, Any],
    half: bool = False,
    int8: bool = False,
    nms: NMSSettings | None = None,
) -> Path:
    """Write `out` (e.g. best.mlpackage): ML Program, RGB image input 'images' scaled 1/255, outputs 'output0' (and
    'output1', the prototypes, for segmentation), metadata; with `nms`, the detector + NonMaximumSuppression pipeline
    (outputs 'confidence', 'coordinates') that Vision reads."""
    if nms is not None and not isinstance(nms, NMSSettings):
        raise ExportError(f"export_coreml: nms takes NMSSettings (the --nms thresholds and top-k), not {nms!r}")
    if nms is not None:
        check_nms_model(model)
    ct = import_coremltools()
    im = torch.zeros(1, 3, *imgsz, dtype=torch.float32)
    net = copy.deepcopy(model).float().cpu()  # coremltools converts a float32 CPU program
    if nms is None:
        names = output_names(net)
        mlmodel = _convert(ct, ExportModel(net), im, names, half, int8)
        for name, axes in zip(names, _head_class(net).output_axes()):
            mlmodel.output_description[name] = _output_text(net, name, axes)
    else:
        mlmodel = _nms_pipeline(ct, net, im, [str(n) for n in metadata.get("names", [])], nms, half, int8)
        metadata = {**metadata, "nms": asdict(nms)}
    mlmodel.short_description = str(metadata.get("description", "mobile_yolo detector"))
    mlmodel.user_defined_metadata.update(_metadata_strings({**metadata, "half": half, "int8": int8}))
    out = Path(out)
    with atomic_path(out, is_ours=is_coreml_export) as tmp:
        mlmodel.save(str(tmp))
    return out


def _output_text(model: nn.Module, name: str, axes: dict[int, str]) -> str:
    """The description Xcode shows for a plain export's output: the head's layout, or the named axes of a further output."""
    if name == "output0":
        return f"{_head_class(model).export_layout}, decoded, in input pixels"
    return "mask prototypes (batch, nm, H/4, W/4)" if "mask_height" in axes.values() else f"axes {axes}"


def export_program(module: nn.Module, im: torch.Tensor) -> torch.export.ExportedProgram:
    """`module` on `im` as the ATen program coremltools converts (torch.export, decomposed)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        return torch.export.export(module, (im,)).run_decompositions({})


def _convert(ct: Any, module: nn.Module, im: torch.Tensor, outputs: list[str], half: bool, int8: bool) -> Any:
    """`module` (float32, CPU) as an ML Program (iOS 15) with the RGB ImageType input 'images' scaled 1/255 and `outputs`."""
    program = export_program(module, im)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools' untested-torch-version warning
        image = ct.ImageType(name=INPUT_NAME, shape=tuple(im.shape), scale=1 / 255, bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB)
        precision = ct.precision.FLOAT16 if half else ct.precision.FLOAT32
        mlmodel = ct.convert(
            program, inputs=[image], outputs=[ct.TensorType(name=n) for n in outputs], convert_to="mlprogram",
            compute_precision=precision, minimum_deployment_target=ct.target.iOS15,
        )  # fmt: skip
        return _int8_weights(ct, mlmodel) if int8 else mlmodel


def _nms_pipeline(ct: Any, net: nn.Module, im: torch.Tensor, names: list[str], settings: NMSSettings, half: bool, int8: bool) -> Any:
    """The pipeline detector (raw_confidence, raw_coordinates) -> NonMaximumSuppression (confidence, coordinates)."""
    policy = getattr(getattr(net, "head", None), "policy", None)
    if policy is not None and not policy.nms_export:  # NMS-free heads (end-to-end, RT-DETR): as exporter.py refuses
        raise ExportError(f"--nms: {policy.nms_reason or 'not available for this head'}")
    try:
        settings.check()
    except ValueError as e:
        raise ExportError(str(e)) from None
    check_nms(settings)
    module = NMSInputs(net, (int(im.shape[2]), int(im.shape[3])))
    with torch.no_grad():
        shapes = {name: tuple(t.shape) for name, t in zip((RAW_CONFIDENCE, RAW_COORDINATES), module(im))}
    if len(names) != shapes[RAW_CONFIDENCE][1]:
        raise ExportError(
            f"Core ML --nms needs one class name per class: the metadata has {len(names)} names for {shapes[RAW_CONFIDENCE][1]} classes"
        )
    detector = _convert(ct, module, im, list(shapes), half, int8)
    raw = detector.get_spec().description.output
    got = {f.name: tuple(f.type.multiArrayType.shape) for f in raw}
    if got != shapes:  # the NMS inputs copy these types; Core ML's pipeline check matches names, types and shapes
        raise ExportError(f"Core ML --nms: the converted detector's outputs are {got}, expected {shapes}")
    nms_model = ct.models.MLModel(_nms_spec(ct, raw, names, settings))
    pipeline = ct.utils.make_pipeline(detector, nms_model)
    pipeline.input_description[INPUT_NAME] = "RGB image, 0-255"
    pipeline.input_description[IOU_INPUT] = f"(optional) IoU threshold override (default {settings.iou_thres})"
    pipeline.input_description[CONF_INPUT] = f"(optional) confidence threshold override (default {settings.conf_thres})"
    pipeline.output_description[CONFIDENCE] = "boxes x class confidence (class names in the labels and metadata 'names')"
    pipeline.output_description[COORDINATES] = "boxes x [centre-x, centre-y, width, height], relative to the image size"
    return pipeline


def _nms_spec(ct: Any, raw: Sequence[Any], names: list[str], settings: NMSSettings) -> Any:
    """Core ML's NonMaximumSuppression model reading the detector's `raw` output features (copied, so the pipeline's
    types match): PickTop per class (argmax label) unless agnostic, at most topk_all boxes out, the class names as labels."""
    spec = ct.proto.Model_pb2.Model()
    spec.specificationVersion = NMS_SPEC_VERSION
    for feature in raw:
        spec.description.input.add().CopyFrom(feature)
    for name in (IOU_INPUT, CONF_INPUT):
        threshold = spec.description.input.add(name=name)
        threshold.type.doubleType.SetInParent()
        threshold.type.isOptional = True
    for name, width in ((CONFIDENCE, len(names)), (COORDINATES, 4)):
        array = spec.description.output.add(name=name).type.multiArrayType
        array.dataType = raw[0].type.multiArrayType.dataType  # FLOAT32: inputs and outputs must share one type
        array.shapeRange.sizeRanges.add(lowerBound=0, upperBound=settings.topk_all)  # the upper bound caps the boxes
        array.shapeRange.sizeRanges.add(lowerBound=width, upperBound=width)
    nms = spec.nonMaximumSuppression
    nms.confidenceInputFeatureName, nms.coordinatesInputFeatureName = RAW_CONFIDENCE, RAW_COORDINATES
    nms.iouThresholdInputFeatureName, nms.confidenceThresholdInputFeatureName = IOU_INPUT, CONF_INPUT
    nms.confidenceOutputFeatureName, nms.coordinatesOutputFeatureName = CONFIDENCE, COORDINATES
    nms.iouThreshold, nms.confidenceThreshold = settings.iou_thres, settings.conf_thres
    nms.pickTop.SetInParent()  # perClass False (agnostic) is proto3's default: mark the oneof as set explicitly
    nms.pickTop.perClass = not settings.agnostic
    nms.stringClassLabels.vector.extend(names)
    return spec


def _int8_weights(ct: Any, mlmodel: Any) -> Any:
    """Weights linearly quantised to int8 (symmetric, per channel); activations keep the model's float precision."""
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric"))
    return ct.optimize.coreml.linear_quantize_weights(mlmodel, config=config)


def is_coreml_export(path: Path) -> bool:
    """True for an .mlpackage this project exported (its metadata names us), so a re-export may replace it."""
    try:
        return path.suffix == ".mlpackage" and coreml_metadata(path).get("description") == EXPORT_DESCRIPTION
    except Exception:  # not a readable Core ML package: treat it as the user's folder and leave it alone
        return False
