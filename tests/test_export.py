"""export.py: ONNX / TorchScript / OpenVINO / INT8 exports match the PyTorch model, carry metadata, and fail cleanly."""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export
from models.model import DetectionModel
from models.registry import get_module
from tests.conftest import calibrate_bn, random_images, rounding_tol
from utils.checkpoint import save_checkpoint
from utils.export.exporter import output_path
from utils.export.formats import ExportError, export_onnx_model
from utils.export.quantize import QuantizeError, _letterboxed_chw, float_tail_nodes, quantize_onnx

MODELS = Path(__file__).resolve().parents[1] / "models"
NAMES = ["a", "b", "c"]


def make_checkpoint(path: Path, cfg: str = "yolov5n.yaml") -> Path:
    """A tiny 3-class checkpoint at `path`: fixed seed, BN calibrated on [0, 1] images so predictions depend on the input."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DetectionModel(cfg, nc=len(NAMES))
    calibrate_bn(model, (8, 3, 96, 128), normalise=False)
    return save_checkpoint(path, model, names=NAMES)


def torch_reference(weights: Path, x: torch.Tensor) -> torch.Tensor:
    """Predictions of the fused eval model stored in `weights`."""
    from utils.checkpoint import load_model

    with torch.no_grad():
        return load_model(weights).fuse()(x)[0]


def checkpoint_tol(weights: Path) -> float:
    """rounding_tol of the fused float32 model stored in `weights`."""
    from utils.checkpoint import load_model

    return rounding_tol(load_model(weights).fuse())


def assert_segmentation_parity(backend: object, weights: Path, size: tuple[int, int]) -> None:
    """An exported segmentation model returns the .pt's two outputs in its layout: detections with mask coefficients,
    and prototypes, each within the checkpoint's float32 rounding tolerance (prototypes relative to their scale)."""
    from utils.runtime.backend import DetectBackend

    x = random_images((2, 3, *size), seed=0, normalise=False)
    with torch.no_grad():
        (det, protos), (ref_det, ref_protos) = backend(x), DetectBackend(weights)(x)  # type: ignore[operator]
    tol = checkpoint_tol(weights)
    assert_close_predictions(det.numpy(), ref_det.numpy(), tol)  # boxes, scores and raw mask coefficients
    assert protos.shape == ref_protos.shape == (2, 32, size[0] // 4, size[1] // 4)
    assert float((protos - ref_protos).abs().max()) < tol * float(ref_protos.abs().max())


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    """Run an ONNX file on the CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


def prediction_errors(y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, anchor_axis: int = 1) -> tuple[float, float]:
    """(box error relative to the largest box coordinate, absolute score error) of (B, N, 4 + scores) predictions.

    `anchor_axis` is the axis that runs over predictions (the head's `anchor_axis`): 2 for (B, 4 + nc, N) layouts, which
    are transposed to rows first, or pixel coordinates would be compared as scores.
    """
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    if anchor_axis == 2:
        y, ref = np.swapaxes(y, 1, 2), np.swapaxes(ref, 1, 2)
    box_err = np.abs(y[..., :4] - ref[..., :4]).max() / np.abs(ref[..., :4]).max()
    return float(box_err), float(np.abs(y[..., 4:] - ref[..., 4:]).max())


def assert_close_predictions(y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, tol: float, anchor_axis: int = 1) -> None:
    """(B, N, 5+nc) predictions ((B, 4+nc, N) with anchor_axis=2) equal up to float32 rounding: each quantity within `tol` of its scale.

    An export runs the same fused float32 graph with other kernels, so only rounding differs: the raw outputs agree
    within rounding_tol (a relative tolerance derived from eps32, see conftest) of their scale. Decoding is smooth
    (box = affine in sigmoid(t) per level, score = sigmoid(t) with slope <= 1/4), so boxes agree within `tol` times the
    largest box coordinate and scores (scale 1) within `tol` absolute. An export bug shows up as whole pixels / 0.1 scores.
    """
    box_err, score_err = prediction_errors(y, ref, anchor_axis)
    assert box_err < tol, f"box error {box_err:.2e} of the largest coordinate (tolerance {tol:.1e})"
    assert score_err < tol, f"score error {score_err:.2e} (tolerance {tol:.1e})"


def assert_onnx_parity(model: nn.Module, imgsz: tuple[int, int], tmp_path: Path, batch: int = 1, seed: int = 0) -> Path:
    """Export a copy of `model` (fused) to ONNX and check ONNX Runtime against PyTorch; returns the ONNX path.

    `model` should be BN-calibrated. The predictions must also change with the input by far more than the tolerance,
    or agreement would prove nothing.
    """
    fused = copy.deepcopy(model).eval().fuse()
    if hasattr(fused.head, "cv3"):  # anchor-free: the class prior (~1e-5) pins untrained scores where parity proves nothing;
        for branch in fused.head.cv3:  # a trained head's scores spread over (0, 1), as they do with zero bias
            torch.nn.init.zeros_(branch[-1].bias)
    tol = rounding_tol(fused)
    x = random_images((batch, 3, *imgsz), seed=seed, normalise=False)
    rows = (lambda y: np.swapaxes(y, 1, 2)) if fused.head.anchor_axis == 2 else (lambda y: y)  # to (B, N, 4 + scores)
    with torch.no_grad():
        ref = rows(fused(x)[0].numpy())
        other = rows(fused(random_images((batch, 3, *imgsz), seed=seed + 1, normalise=False))[0].numpy())
    assert np.abs(other[..., 4:] - ref[..., 4:]).max() > 10 * tol
    path = export_onnx_model(fused, tmp_path / "parity.onnx", imgsz, batch_size=batch)
    assert_close_predictions(rows(ort_run(path, x)), ref, tol)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")



@pytest.mark.parametrize("imgsz", [(64, 64), (64, 96)])
def test_onnx_static_parity(imgsz: tuple[int, int], tmp_path: Path) -> None:
    model = calibrate_bn(DetectionModel("yolov5n.yaml", nc=3), (16, 3, *imgsz), normalise=False)
    path = assert_onnx_parity(model, imgsz, tmp_path)
    shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, *imgsz]


def test_run_writes_next_to_weights_with_metadata(ckpt: Path) -> None:
    files = export.run(weights=ckpt, include=["onnx"], imgsz=[64, 96])
    assert files == [ckpt.with_suffix(".onnx")]
    proto = onnx.load(str(files[0]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["stride"] == "32" and json.loads(props["names"]) == NAMES
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output0"]
    x = torch.rand(1, 3, 64, 96)
    assert_close_predictions(ort_run(files[0], x), torch_reference(ckpt, x), checkpoint_tol(ckpt))


def test_dynamic_onnx_runs_at_several_shapes(ckpt: Path, tmp_path: Path) -> None:
    (path,) = export.run(weights=ckpt, include=["onnx"], imgsz=64, dynamic=True, output=tmp_path / "dyn.onnx")
    assert path == tmp_path / "dyn.onnx"
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128)]:
        x = torch.rand(*shape)
        y = ort_run(path, x)
        assert y.shape == (shape[0], 3 * (shape[2] * shape[3]) // 64 * 21 // 16, 8)
        assert_close_predictions(y, torch_reference(ckpt, x), checkpoint_tol(ckpt))


def test_torchscript_round_trip(ckpt: Path, tmp_path: Path) -> None:
    (path,) = export.run(weights=ckpt, include=["torchscript"], imgsz=64, output=tmp_path / "m.torchscript")
    extra = {"config.txt": ""}
    ts = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["config.txt"])
    assert meta["names"] == NAMES and meta["stride"] == 32 and meta["imgsz"] == [64, 64]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert_close_predictions(ts(x), torch_reference(ckpt, x), checkpoint_tol(ckpt))


def test_export_from_cfg_uses_yaml_classes(tmp_path: Path) -> None:
    (path,) = export.run(cfg="yolov5n.yaml", include=["onnx"], imgsz=64, output=tmp_path / "cfg.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert len(json.loads(props["names"])) == 80
    assert ort_run(path, torch.rand(1, 3, 64, 64)).shape == (1, 252, 85)


def test_imgsz_rounded_up_to_stride_with_warning(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        (path,) = export.run(weights=ckpt, include=["onnx"], imgsz=70, output=tmp_path / "r.onnx")
    pattern = re.compile(r"multiple of the max stride 32.*\[96, 96\]")
    assert any(pattern.search(r.getMessage()) for r in caplog.records)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 96]


def test_unknown_include_lists_known_formats(ckpt: Path) -> None:
    with pytest.raises(ExportError, match="onnx, torchscript, openvino, ncnn, tflite, coreml"):
        export.run(weights=ckpt, include=["paddle"])
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(ckpt), "--include", "onnx", "paddle"])
    msg = str(e.value)
    assert msg.startswith("export: error:") and "coreml" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all"])
def test_unreadable_weights_one_line_error(tmp_path: Path, content: bytes | None) -> None:
    weights = tmp_path / "broken.pt"
    if content is not None:
        weights.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(weights)])
    msg = str(e.value)
    assert msg.startswith("export: error:") and str(weights) in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == (["broken.pt"] if content else [])


def test_failed_export_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = make_checkpoint(tmp_path / "best.pt")

    def broken_export(*args: object, **kwargs: object) -> None:
        Path(str(args[2])).write_bytes(b"half an onnx file")  # the real exporter may have started writing
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="simulated"):
        export.run(weights=weights, include=["onnx"], imgsz=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_simplify_without_packages_warns_and_continues(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        (path,) = export.run(weights=ckpt, include=["onnx"], imgsz=64, simplify=True, output=tmp_path / "s.onnx")
    assert path.is_file() and any("pip install onnxslim" in r.getMessage() for r in caplog.records)


def test_option_errors_are_one_line(ckpt: Path) -> None:
    with pytest.raises(ExportError, match="--int8 needs"):
        export.run(weights=ckpt, int8=True)
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="--half needs a CUDA device"):
            export.run(weights=ckpt, half=True)
    with pytest.raises(ExportError, match="--weights"):
        export.run()


def test_openvino_missing_package_hint(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ExportError, match="pip install openvino"):
        export.run(weights=ckpt, include=["openvino"], imgsz=64, output=tmp_path / "m_openvino_model")
    assert list(tmp_path.iterdir()) == []


def test_openvino_export_matches_pytorch(ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from utils.runtime.backend import DetectBackend

    (path,) = export.run(weights=ckpt, include=["openvino"], imgsz=64, output=tmp_path / "m_openvino_model")
    assert (path / "m.xml").is_file() and (path / "m.bin").is_file() and (path / "metadata.yaml").is_file()
    backend = DetectBackend(path)
    assert backend.names == NAMES and backend.stride == 32
    x = torch.rand(1, 3, 64, 64)
    assert_close_predictions(backend(x), torch_reference(ckpt, x), checkpoint_tol(ckpt))


def test_output_path_rules(tmp_path: Path) -> None:
    base = tmp_path / "best"
    assert output_path(base, "onnx", False) == tmp_path / "best.onnx"
    assert output_path(base, "torchscript", True) == tmp_path / "best.torchscript"
    assert output_path(base, "openvino", False) == tmp_path / "best_openvino_model"
    assert output_path(base, "onnx", True) == tmp_path / "best_int8.onnx"
    assert output_path(base, "openvino", True) == tmp_path / "best_int8_openvino_model"
    assert output_path(base, "onnx", True, tmp_path / "x.onnx") == tmp_path / "x.onnx"
    assert output_path(base, "openvino", False, tmp_path / "x.onnx") == tmp_path / "x_openvino_model"


def _noise_images(folder: Path, n: int = 8, seed: int = 0) -> list[Path]:
    """n random-noise images of assorted sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.jpg"), rng.integers(0, 256, (40 + 8 * i, 72, 3), dtype=np.uint8))
    return [folder / f"{i}.jpg" for i in range(n)]


def _calibration_folder(folder: Path, n: int = 8) -> Path:
    """n random-noise images of assorted sizes plus one corrupt file."""
    _noise_images(folder, n)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_int8_quantized_model_runs_and_keeps_head_float(
    ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fp32 = export.run(weights=ckpt, include=["onnx"], imgsz=64, output=tmp_path / "fp32.onnx")[0]
    images = sorted(_calibration_folder(tmp_path / "calib").iterdir())
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", images, 64, n_calib=300)
    assert any("1 of 9 calibration images" in r.getMessage() for r in caplog.records)
    proto = onnx.load(str(int8))
    producers = {o: n for n in proto.graph.node for o in n.output}
    head = [n for n in proto.graph.node if n.name in set(float_tail_nodes(onnx.load(str(fp32)))) and n.op_type == "Conv"]
    assert len(head) == 3  # one 1x1 conv per Detect level, kept float
    assert all(producers[n.input[1]].op_type != "DequantizeLinear" for n in head if n.input[1] in producers)
    body = [n for n in proto.graph.node if n.op_type == "Conv" and n not in head]
    assert body and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in body)
    # two held-out images from the calibration distribution, letterboxed the same way (resizing smooths the noise, so
    # full-resolution noise would lie outside the calibrated activation ranges)
    x, x2 = (torch.from_numpy(_letterboxed_chw(p, (64, 64)))[None] for p in _noise_images(tmp_path / "held_out", 2, seed=1))
    y, ref = ort_run(int8, x), ort_run(fp32, x)
    assert y.shape == ref.shape and np.isfinite(y).all()
    other = ort_run(fp32, x2)
    # quantisation noise must be well below the change a different image causes
    assert np.abs(y[..., 4:] - ref[..., 4:]).mean() < 0.5 * np.abs(other[..., 4:] - ref[..., 4:]).mean()


def test_int8_of_dynamic_onnx_leaves_no_scratch_files(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's shape inference of a dynamic model writes scratch files beside its input and into the cwd: none may stay."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir()
    cwd.mkdir()
    fp32 = export.run(weights=ckpt, include=["onnx"], imgsz=64, dynamic=True, output=out / "fp32.onnx")[0]
    images = sorted(_calibration_folder(tmp_path / "calib").iterdir())
    monkeypatch.chdir(cwd)
    quantize_onnx(fp32, out / "int8.onnx", images, 64, n_calib=4)
    assert sorted(p.name for p in out.iterdir()) == ["fp32.onnx", "int8.onnx"] and not list(cwd.iterdir())


@pytest.mark.slow
def test_int8_export_via_cli_with_dataset_yaml(ckpt: Path, tmp_path: Path) -> None:
    calib = _calibration_folder(tmp_path / "images")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images\nval: images\nnames: [a, b, c]\n", encoding="utf-8")
    (path,) = export.main(["--weights", str(ckpt), "--imgsz", "64", "--int8", "--data", str(data), "--output", str(tmp_path / "q")])
    assert path == tmp_path / "q.onnx" and calib.is_dir()
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["names"]) == NAMES and props["int8"] == "true"
    assert ort_run(path, torch.rand(1, 3, 64, 64)).shape == (1, 252, 8)


def test_int8_without_images_is_clear(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizeError, match="no calibration images"):
        export.run(weights=ckpt, include=["onnx"], imgsz=64, int8=True, data=tmp_path / "empty", output=tmp_path / "e.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def _backbone_configs() -> list:
    """Shipped MobileNetV4 / MobileOne detector configs (both heads) and yolov8n/s; all but two marked slow."""
    try:
        get_module("MobileNetV4ConvSmall")
        get_module("MobileOneS0")
    except (KeyError, ValueError):
        return []
    files = sorted({*MODELS.glob("yolov[58]*_mobilenetv4*.yaml"), *MODELS.glob("yolov[58]*_mobileone*.yaml"), *MODELS.glob("yolov8?.yaml")})
    fast = ("yolov5n_mobilenetv4_conv_small", "yolov8s_mobileone_s0")  # one per head; the MobileOne one also folds MobileOneBlock rows
    return [pytest.param(f.name, marks=() if any(k in f.stem for k in fast) else pytest.mark.slow, id=f.stem) for f in files]


@pytest.mark.parametrize("cfg", _backbone_configs())
def test_backbone_config_onnx_parity(cfg: str, tmp_path: Path) -> None:
    assert_onnx_parity(calibrate_bn(DetectionModel(cfg, nc=3), (16, 3, 64, 64), normalise=False), (64, 64), tmp_path)
