"""Every shipped MobileNetV4 / MobileOne detector config exports to every installed format and runs there like the .pt.

Slow (minutes per config on 2 cores): `python -m pytest -m slow tests/test_format_matrix.py`. The README's format table
lists what this run gives per config and format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_export import assert_close_predictions

from models.model import DetectionModel
from tests.conftest import calibrate_bn, random_images, rounding_tol
from utils.checkpoint import save_checkpoint
from utils.export.exporter import export_model
from utils.runtime.backend import DetectBackend

MODELS = Path(__file__).resolve().parents[1] / "models"
PACKAGES = {"onnx": "onnxruntime", "torchscript": "torch", "openvino": "openvino", "ncnn": "ncnn"}
SIZE = (64, 96)


def mobile_configs() -> list[str]:
    """Shipped detector configs on a MobileNetV4 or MobileOne backbone, both heads.

    Segmentation configs (*-seg.yaml) are left out: they export to a subset of the formats only, with a second output (mask
    prototypes), so this detection matrix and the README table it fills do not apply to them; so are RT-DETR configs
    (ONNX, TorchScript and OpenVINO only, checked by tests/test_rtdetr.py::test_every_config_exports).
    """
    mobile = (p for p in MODELS.glob("*.yaml") if "mobilenetv4" in p.stem or "mobileone" in p.stem)
    return sorted(p.name for p in mobile if not p.stem.endswith("-seg") and not p.stem.startswith("rtdetr_"))


def installed_formats() -> list[str]:
    """The formats whose runtime (and converter) is importable here."""
    ok = [f for f, pkg in PACKAGES.items() if importlib.util.find_spec(pkg) is not None]
    return [f for f in ok if f != "ncnn" or importlib.util.find_spec("pnnx") is not None]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", mobile_configs())
def test_config_runs_in_every_format(cfg: str, tmp_path: Path) -> None:
    model = calibrate_bn(DetectionModel(cfg, nc=3), (8, 3, *SIZE), normalise=False)
    weights = save_checkpoint(tmp_path / "best.pt", model, names=["a", "b", "c"])
    reference = DetectBackend(weights)
    x = random_images((1, 3, *SIZE), normalise=False)
    with torch.no_grad():
        ref = reference(x)
    tol = rounding_tol(reference.model)
    failures = {}
    for fmt in installed_formats():
        try:
            (path,) = export_model(weights=weights, include=[fmt], imgsz=list(SIZE))
            with torch.no_grad():
                assert_close_predictions(DetectBackend(path)(x), ref, tol)
        except Exception as e:  # collect every format's outcome for the table, then fail once
            failures[fmt] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    assert not failures, failures
