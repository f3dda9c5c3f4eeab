"""Core ML export (.mlpackage, ML Program) of a fused DetectionModel via coremltools from a torch.export ExportedProgram.

torch.export, not torch.jit.trace: coremltools 9.0 fails on the traced aten::Int of the anchor-free head and of
MobileNetV4 attention blocks under NumPy 2 ("only 0-dimensional arrays can be converted to Python scalars").

The input is an RGB ImageType scaled by 1/255 (so Core ML feeds the [0, 1] tensor our models take); the output
'output0' is the head's decoded export layout; the metadata dict is stored in the model's user-defined metadata
(strings; lists/dicts as JSON). Conversion works on Linux; predictions need the Core ML runtime (macOS only). Reading
that metadata back and checking for the runtime are utils/runtime/coreml.py's.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from utils.export.formats import EXPORT_DESCRIPTION, INPUT_NAME, OUTPUT_NAME, ExportError, ExportModel, atomic_path
from utils.runtime import coreml as runtime_coreml
from utils.runtime.coreml import coreml_metadata


def import_coremltools() -> Any:
    """The coremltools package, or a one-line ExportError naming the pip command."""
    return runtime_coreml.import_coremltools("Core ML export", ExportError)


def _metadata_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """Core ML user-defined metadata is str -> str: strings as they are, everything else as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def export_coreml(
    model: nn.Module,
    out: Union[str, Path],
    imgsz: tuple[int, int],
    metadata: dict[str, Any],
    half: bool = False,
    int8: bool = False,
    nms: bool = False,
) -> Path:
    """Write `out` (e.g. best.mlpackage): ML Program, RGB image input 'images' scaled 1/255, output 'output0', metadata."""
    if nms:
        raise ExportError("Core ML export with nms=True (model + NonMaximumSuppression pipeline) is not implemented yet")
    ct = import_coremltools()
    im = torch.zeros(1, 3, *imgsz, dtype=torch.float32)
    wrapper = ExportModel(copy.deepcopy(model).float().cpu())  # coremltools converts a float32 CPU trace
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings, coremltools' untested-torch-version warning
        program = torch.export.export(wrapper, (im,)).run_decompositions({})
        image = ct.ImageType(name=INPUT_NAME, shape=tuple(im.shape), scale=1 / 255, bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB)
        precision = ct.precision.FLOAT16 if half else ct.precision.FLOAT32
        mlmodel = ct.convert(
            program, inputs=[image], outputs=[ct.TensorType(name=OUTPUT_NAME)], convert_to="mlprogram",
            compute_precision=precision, minimum_deployment_target=ct.target.iOS15,
        )  # fmt: skip
        if int8:
            mlmodel = _int8_weights(ct, mlmodel)
    mlmodel.short_description = str(metadata.get("description", "mobile_yolo detector"))
    mlmodel.user_defined_metadata.update(_metadata_strings({**metadata, "half": half, "int8": int8}))
    out = Path(out)
    with atomic_path(out, is_ours=is_coreml_export) as tmp:
        mlmodel.save(str(tmp))
    return out


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
