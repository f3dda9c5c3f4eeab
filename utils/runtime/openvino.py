"""OpenVINO runner: an exported IR (a *_openvino_model/ folder, or its .xml) compiled for the CPU, with its metadata.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import yaml

from utils.runtime.packages import import_optional
from utils.signal_stack import keep_signal_stack

OPENVINO_METADATA = "metadata.yaml"  # the sidecar export.py writes beside the .xml/.bin (NCNN folders use the same name)


def import_openvino() -> Any:
    """The openvino package, or a one-line MissingPackageError with the install hint."""
    return import_optional("openvino", "OpenVINO inference", "pip install openvino")


def find_xml(path: Path) -> Path:
    """The .xml of an OpenVINO folder (the first by name) or the given .xml; FileNotFoundError names the path."""
    xmls = [path] if path.suffix == ".xml" else sorted(path.glob("*.xml"))
    xml = xmls[0] if xmls else path / "model.xml"
    if not xml.is_file():
        raise FileNotFoundError(f"{path}: no OpenVINO .xml model found")
    return xml


def read_openvino_metadata(path: Path) -> dict[str, Any]:
    """The metadata.yaml sidecar as a dict ({} when absent or not a mapping)."""
    meta = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return meta if isinstance(meta, dict) else {}


class OpenvinoRunner:
    """Compile an OpenVINO model for the CPU; calling it maps a (B, 3, H, W) array to the list of the model's outputs."""

    def __init__(self, path: Union[str, Path]) -> None:
        ov = import_openvino()
        self.path = Path(path)
        self.xml = find_xml(self.path)
        core = ov.Core()
        model = core.read_model(str(self.xml))
        # (B, 3, H, W) with None for dynamic dimensions
        self.input_shape: list[int | None] = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        self.metadata = read_openvino_metadata(self.xml.parent / OPENVINO_METADATA)
        # An fp32 export runs in f32: on CPUs with bf16 units OpenVINO's default would silently compute it in bf16
        config = {} if self.metadata.get("half") else {"INFERENCE_PRECISION_HINT": "f32"}
        with keep_signal_stack():  # the CPU plugin swaps this thread's signal stack for one it may unmap from another thread
            self.compiled = core.compile_model(model, "CPU", config)

    def __call__(self, x: np.ndarray) -> list[Any]:
        """The model's outputs for one batch, in output order."""
        return list(self.compiled(x).values())
