"""Shipped detector, segmentation and RT-DETR configs export to every installed format their head lists and run there like the .pt.

The full matrix (every shipped detection, segmentation and RT-DETR config) is slow, minutes per config on 2 cores:
`python -m pytest -m slow tests/test_format_matrix.py -rP` (-rP prints each config's max difference and tolerance per
format; `-k tflite` runs one format). A format is skipped where its converter or runtime is not installed. The default
suite runs one small config per head kind through the same check. docs/export.md lists what the slow run gives per
config and format.

Every output is compared on its own scale, which is what rounding_tol bounds: boxes relative to the largest box
coordinate, scores ([0, 1]) absolutely, segmentation mask coefficients and prototypes relative to their largest value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import prediction_errors

from models.model import DetectionModel
from tests.conftest import calibrate_bn, query_set_error, random_images, rounding_tol
from utils.checkpoint import save_checkpoint
from utils.export.exporter import export_model
from utils.runtime.backend import DetectBackend

MODELS = Path(__file__).resolve().parents[1] / "models"
PACKAGES = {  # format -> what its converter and runtime need (find_spec only: importing TensorFlow here would crash triton)
    "onnx": ("onnxruntime",),
    "torchscript": ("torch",),
    "openvino": ("openvino",),
    "ncnn": ("ncnn", "pnnx"),
    "tflite": ("ai_edge_litert", "tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "onnxslim"),
}
SIZE = (64, 96)  # RT-DETR: 126 encoder positions <= its 300 queries, so every position is a query and rounding cannot change the set
NAMES = ["a", "b", "c"]
SMALL_PER_HEAD = {  # the default suite's configs, one per head kind
    "anchor_based": "yolov5n_mobileone_s0.yaml",
    "anchor_free": "yolov8n.yaml",
    "end2end": "yolo26n_mobilenetv4_conv_small.yaml",
    "segment": "yolov5n-seg.yaml",
    "rtdetr": "rtdetr_csp_small.yaml",
}


def shipped_configs() -> list[str]:
    """Every shipped detection (all heads), segmentation and RT-DETR config; classifiers have their own export tests."""
    return sorted(p.name for p in MODELS.glob("*.yaml") if not p.stem.endswith("-cls"))


def installed_formats() -> list[str]:
    """The formats whose runtime (and converter) is importable here."""
    return [f for f, pkgs in PACKAGES.items() if all(importlib.util.find_spec(p) is not None for p in pkgs)]


def head_formats(model: DetectionModel) -> list[str]:
    """The installed formats that the model's head policy exports to (all of them where the policy lists none)."""
    listed = model.head.policy.export_formats
    return [f for f in installed_formats() if listed is None or f in listed]


@torch.no_grad()
def trained_like(cfg: str) -> DetectionModel:
    """A BN-calibrated 3-class model of `cfg` whose class-score biases are zeroed, as training spreads them.

    At their init prior (~1e-2 to 1e-5) the scores sit where sigmoid is flat, so agreement of scores would prove nothing.
    """
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=len(NAMES))
    calibrate_bn(model, (8, 3, *SIZE), normalise=False)
    head: Any = model.head
    if head.kind == "rtdetr":
        for score in (head.enc_score_head, *head.dec_score_head):
            score.bias.zero_()
    elif head.kind in ("anchor_free", "end2end"):
        for branch in (*head.cv3, *getattr(head, "one2one_cv3", ())):
            branch[-1].bias.zero_()
    else:  # anchor-based rows: xywh, objectness, classes[, mask coefficients]
        for conv in head.m:
            conv.bias.view(head.na, -1)[:, 4 : 5 + head.nc].zero_()
    return model


def output_errors(got: Any, ref: Any, kind: str, nc: int) -> dict[str, float]:
    """Each output quantity's difference on its own scale (see the module docstring); `kind` is the head kind."""
    if kind in ("rtdetr", "end2end"):  # ranked rows: (1, Q, 4 + nc) queries or (1, max_det, 6) final detections
        return {"queries": query_set_error(np.asarray(got, np.float64), np.asarray(ref, np.float64))}
    if kind != "segment":
        box, score = prediction_errors(got, ref, 2 if kind == "anchor_free" else 1)
        return {"box": box, "score": score}
    (det, protos), (det_ref, protos_ref) = ([np.asarray(a, np.float64) for a in pair] for pair in (got, ref))
    box, score = prediction_errors(det[..., : 5 + nc], det_ref[..., : 5 + nc])
    coef = np.abs(det[..., 5 + nc :] - det_ref[..., 5 + nc :]).max() / np.abs(det_ref[..., 5 + nc :]).max()
    proto = np.abs(protos - protos_ref).max() / np.abs(protos_ref).max()
    return {"box": box, "score": score, "mask_coef": float(coef), "proto": float(proto)}


def score_spread(ref: Any, kind: str, nc: int) -> float:
    """The range of the reference's class scores over all predictions: agreement within tol must mean something."""
    y = np.asarray(ref[0] if kind == "segment" else ref, np.float64)
    y = np.swapaxes(y, 1, 2) if kind == "anchor_free" else y
    first = {"anchor_free": 4, "rtdetr": 4, "end2end": 4}.get(kind, 5)
    return float(np.ptp(y[..., first : first + (1 if kind == "end2end" else nc)]))


def export_each(weights: Path, formats: list[str]) -> dict[str, Path | str]:
    """The exported path per format, or its error: one export call for all (one load and trace), each alone if that fails."""
    try:
        return dict(zip(formats, export_model(weights=weights, include=formats, imgsz=list(SIZE))))
    except Exception:  # export again one by one to name the format that fails
        out: dict[str, Path | str] = {}
        for fmt in formats:
            try:
                (out[fmt],) = export_model(weights=weights, include=[fmt], imgsz=list(SIZE))
            except Exception as e:
                out[fmt] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return out


def format_parity(cfg: str, tmp_path: Path, only: str | None = None) -> dict[str, str]:
    """Export `cfg` to its formats (or `only` that one); per format 'ok'/'FAIL' with the worst difference and tolerance, or the error."""
    model = trained_like(cfg)
    formats = [f for f in head_formats(model) if only in (None, f)]
    if not formats:
        pytest.skip(f"{cfg}: {only} is not installed here or not a format its head exports to")
    weights = save_checkpoint(tmp_path / "best.pt", model, names=NAMES)
    reference = DetectBackend(weights)
    kind, x = model.head.kind, random_images((1, 3, *SIZE), normalise=False)
    with torch.no_grad():
        ref = reference(x)
    tol = rounding_tol(reference.model)  # the fused model: one conv per re-parameterised unit
    assert score_spread(ref, kind, len(NAMES)) > 10 * tol, "scores do not vary: parity would prove nothing"
    report = {}
    for fmt, path in export_each(weights, formats).items():
        try:
            if isinstance(path, str):
                raise RuntimeError(path)
            with torch.no_grad():
                errors = output_errors(DetectBackend(path)(x), ref, kind, len(NAMES))
            worst = max(errors, key=lambda k: errors[k])
            report[fmt] = f"{'ok' if errors[worst] < tol else 'FAIL'} {worst} {errors[worst]:.2e} / tol {tol:.2e}"
        except Exception as e:  # collect every format's outcome for the table, then fail once
            report[fmt] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"{cfg}: " + "; ".join(f"{k}: {v}" for k, v in report.items()))
    return report


@pytest.mark.parametrize("kind", sorted(SMALL_PER_HEAD))
def test_one_config_per_head_in_every_format(kind: str, tmp_path: Path) -> None:
    cfg = SMALL_PER_HEAD[kind]
    report = format_parity(cfg, tmp_path)
    assert {"onnx", "torchscript"} <= set(report), report
    assert all(v.startswith("ok") for v in report.values()), report


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(PACKAGES))
@pytest.mark.parametrize("cfg", shipped_configs())
def test_config_runs_in_every_format(cfg: str, fmt: str, tmp_path: Path) -> None:
    report = format_parity(cfg, tmp_path, only=fmt)
    assert all(v.startswith("ok") for v in report.values()), report
