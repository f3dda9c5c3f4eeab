"""export.py: ONNX / TorchScript / OpenVINO / INT8 exports match the PyTorch model, carry metadata, and fail cleanly."""

from __future__ import annotations

import copy
import json
import logging
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
from models.registry import get_module
from models.yolo import DetectionModel
from utils.checkpoint import save_checkpoint
from utils.export_formats import ExportError, export_onnx_model
from utils.quantize import QuantizeError, float_tail_nodes, quantize_onnx

MODELS = Path(__file__).resolve().parents[1] / "models"
NAMES = ["a", "b", "c"]
# Exported vs fused PyTorch model: 1e-3 px for coordinates inside the image; beyond it (random heads predict boxes up to
# 4 anchors ~ 1500 px, and random MobileOne stacks reach activations ~1e5) float32 accumulation-order noise grows with the
# value, so a relative 1e-4 applies there. Scores: 1e-4 absolute. An export bug shows up as errors of whole pixels.
BOX_ATOL, BOX_RTOL, SCORE_ATOL = 1e-3, 1e-4, 1e-4


def perturb_(model: nn.Module, seed: int = 0, gain: float | None = 1.4) -> nn.Module:
    """Non-trivial BN statistics, and (with `gain`) conv weights large enough that predictions depend on the input.

    Default init gives nearly input-independent predictions; gain 1.4 suits plain YOLOv5 (1.5+ blows activations up).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and gain:
                m.weight.normal_(0, gain / m.weight[0].numel() ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def make_checkpoint(path: Path, cfg: str = "yolov5n.yaml") -> Path:
    """A tiny perturbed 3-class checkpoint at `path`."""
    model = perturb_(DetectionModel(cfg, nc=len(NAMES)))
    return save_checkpoint(path, model, names=NAMES)


def torch_reference(weights: Path, x: torch.Tensor) -> torch.Tensor:
    """Predictions of the fused eval model stored in `weights`."""
    from utils.checkpoint import load_model

    with torch.no_grad():
        return load_model(weights).fuse()(x)[0]


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    """Run an ONNX file on the CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


def assert_close_predictions(
    y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, size: int, floor: tuple[float, float] = (0.0, 0.0)
) -> None:
    """Box coordinates within BOX_ATOL px (BOX_RTOL relative beyond the image `size`), scores within SCORE_ATOL.

    `floor` (box, score) raises both tolerances to a measured float32 noise level for badly conditioned random models.
    """
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape
    mag = np.abs(ref[..., :4])
    tol = np.maximum(np.where(mag <= size, BOX_ATOL, BOX_RTOL * mag), floor[0])
    box_err = np.abs(y[..., :4] - ref[..., :4])
    score_err = np.abs(y[..., 4:] - ref[..., 4:]).max()
    worst = np.unravel_index(np.argmax(box_err / tol), box_err.shape)
    assert (box_err < tol).all(), f"box error {box_err[worst]:.2e} px at value {ref[..., :4][worst]:.1f} (tolerance {tol[worst]:.1e})"
    assert score_err < max(SCORE_ATOL, floor[1]), f"score error {score_err:.2e}"


def assert_onnx_parity(model: nn.Module, imgsz: tuple[int, int], tmp_path: Path, batch: int = 1, seed: int = 0) -> Path:
    """Export a copy of `model` (fused) to ONNX and check ONNX Runtime against PyTorch; returns the ONNX path.

    ONNX must meet the BOX/SCORE tolerances against the fused float32 model. Where random weights make float32 itself
    too noisy for that (MobileOne stacks reach activations ~1e5), the fallback reference is the unfused model in float64
    (re-parameterisation is exact there) and ONNX must stay within 4x the fused float32 PyTorch model's own error.
    """
    raw = copy.deepcopy(model).eval()
    fused = copy.deepcopy(raw).fuse()
    x = torch.rand(batch, 3, *imgsz, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = fused(x)[0].numpy()
    path = export_onnx_model(fused, tmp_path / "parity.onnx", imgsz, batch_size=batch)
    y = ort_run(path, x)
    try:
        assert_close_predictions(y, ref, max(imgsz))
    except AssertionError:
        with torch.no_grad():
            truth = raw.double()(x.double())[0].numpy()
        noise = np.abs(ref - truth)
        assert_close_predictions(y, truth, max(imgsz), floor=(4 * noise[..., :4].max(), 4 * noise[..., 4:].max()))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture
def propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let caplog see mobile_yolo records even after a CLI call turned propagation off."""
    monkeypatch.setattr(logging.getLogger("mobile_yolo"), "propagate", True)


@pytest.mark.parametrize("imgsz", [(64, 64), (64, 96)])
def test_onnx_static_parity(imgsz: tuple[int, int], tmp_path: Path) -> None:
    model = perturb_(DetectionModel("yolov5n.yaml", nc=3))
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
    assert_close_predictions(ort_run(files[0], x), torch_reference(ckpt, x), 96)


def test_dynamic_onnx_runs_at_several_shapes(ckpt: Path, tmp_path: Path) -> None:
    (path,) = export.run(weights=ckpt, include=["onnx"], imgsz=64, dynamic=True, output=tmp_path / "dyn.onnx")
    assert path == tmp_path / "dyn.onnx"
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128)]:
        x = torch.rand(*shape)
        y = ort_run(path, x)
        assert y.shape == (shape[0], 3 * (shape[2] * shape[3]) // 64 * 21 // 16, 8)
        assert_close_predictions(y, torch_reference(ckpt, x), max(shape))


def test_torchscript_round_trip(ckpt: Path, tmp_path: Path) -> None:
    (path,) = export.run(weights=ckpt, include=["torchscript"], imgsz=64, output=tmp_path / "m.torchscript")
    extra = {"config.txt": ""}
    ts = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["config.txt"])
    assert meta["names"] == NAMES and meta["stride"] == 32 and meta["imgsz"] == [64, 64]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), torch_reference(ckpt, x), rtol=1e-5, atol=1e-4)


def test_export_from_cfg_uses_yaml_classes(tmp_path: Path) -> None:
    (path,) = export.run(cfg="yolov5n.yaml", include=["onnx"], imgsz=64, output=tmp_path / "cfg.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert len(json.loads(props["names"])) == 80
    assert ort_run(path, torch.rand(1, 3, 64, 64)).shape == (1, 252, 85)


def test_imgsz_rounded_up_to_stride_with_warning(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, propagate: None) -> None:
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        (path,) = export.run(weights=ckpt, include=["onnx"], imgsz=70, output=tmp_path / "r.onnx")
    assert any("multiple of max stride 32" in r.getMessage() and "[96, 96]" in r.getMessage() for r in caplog.records)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 96]


def test_unknown_include_lists_known_formats(ckpt: Path) -> None:
    with pytest.raises(ExportError, match="onnx, torchscript, openvino"):
        export.run(weights=ckpt, include=["tflite"])
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(ckpt), "--include", "onnx", "coreml"])
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
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, propagate: None
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
    from utils.backend import DetectBackend

    (path,) = export.run(weights=ckpt, include=["openvino"], imgsz=64, output=tmp_path / "m_openvino_model")
    assert (path / "m.xml").is_file() and (path / "m.bin").is_file() and (path / "metadata.yaml").is_file()
    backend = DetectBackend(path)
    assert backend.names == NAMES and backend.stride == 32
    x = torch.rand(1, 3, 64, 64)
    assert_close_predictions(backend(x), torch_reference(ckpt, x), 64)


def test_output_path_rules(tmp_path: Path) -> None:
    base = tmp_path / "best"
    assert export.output_path(base, "onnx", False) == tmp_path / "best.onnx"
    assert export.output_path(base, "torchscript", True) == tmp_path / "best.torchscript"
    assert export.output_path(base, "openvino", False) == tmp_path / "best_openvino_model"
    assert export.output_path(base, "onnx", True) == tmp_path / "best_int8.onnx"
    assert export.output_path(base, "openvino", True) == tmp_path / "best_int8_openvino_model"
    assert export.output_path(base, "onnx", True, tmp_path / "x.onnx") == tmp_path / "x.onnx"
    assert export.output_path(base, "openvino", False, tmp_path / "x.onnx") == tmp_path / "x_openvino_model"


def _calibration_folder(folder: Path, n: int = 8) -> Path:
    """n random-noise images of assorted sizes plus one corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.jpg"), rng.integers(0, 256, (40 + 8 * i, 72, 3), dtype=np.uint8))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_int8_quantized_model_runs_and_keeps_head_float(
    ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, propagate: None
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
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y, ref = ort_run(int8, x), ort_run(fp32, x)
    assert y.shape == ref.shape and np.isfinite(y).all()
    other = ort_run(fp32, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    # quantisation noise must be well below the change a different image causes
    assert np.abs(y[..., 4:] - ref[..., 4:]).mean() < 0.5 * np.abs(other[..., 4:] - ref[..., 4:]).mean()


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
    """Shipped MobileNetV4 / MobileOne detector configs whose backbones are registered; big ones marked slow."""
    try:
        get_module("MobileNetV4ConvSmall")
        get_module("MobileOneS0")
    except (KeyError, ValueError):
        return []
    files = sorted({*MODELS.glob("yolov5*_mobilenetv4*.yaml"), *MODELS.glob("yolov5*_mobileone*.yaml")})
    fast = ("yolov5n_mobilenetv4_conv_small",)
    return [pytest.param(f.name, marks=() if any(k in f.stem for k in fast) else pytest.mark.slow, id=f.stem) for f in files]


@pytest.mark.parametrize("cfg", _backbone_configs())
def test_backbone_config_onnx_parity(cfg: str, tmp_path: Path) -> None:
    assert_onnx_parity(DetectionModel(cfg, nc=3), (64, 64), tmp_path)
