"""TFLite export (utils/export/tflite.py): float32 / float16 / INT8 files match PyTorch within precision-derived bounds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import random_images, tiny_shapes_yaml
from tests.test_export import assert_close_predictions, assert_segmentation_parity, checkpoint_tol, make_checkpoint
from utils.checkpoint import load_model
from utils.export.formats import ExportError, export_metadata
from utils.export.tflite import export_tflite, tflite_filename
from utils.runtime.tflite import TfliteRunner, read_tflite_metadata

# find_spec, not import: TensorFlow in the pytest process would crash a later triton import (LLVM options clash)
CONVERTER = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "onnxslim"))
RUNTIME = importlib.util.find_spec("ai_edge_litert") is not None
needs_converter = pytest.mark.skipif(not (CONVERTER and RUNTIME), reason="needs the optional TFLite packages (requirements-export.txt)")
IMGSZ = (64, 96)


@pytest.fixture(scope="module")
def tflite_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """yolov5n checkpoint, its fused model, and its float32 / float16 / int8 exports (built once: ~20 s each)."""
    root = tmp_path_factory.mktemp("tflite")
    ckpt = make_checkpoint(root / "best.pt")
    model = load_model(ckpt).fuse()
    meta = export_metadata(model, IMGSZ, 1, False, False)
    calib = [random_images((3, *IMGSZ), seed=100 + i, normalise=False).numpy() for i in range(8)]
    files = {q: export_tflite(model, root / tflite_filename("best", q), IMGSZ, meta, q, calib) for q in ("fp32", "fp16", "int8")}
    x = random_images((2, 3, *IMGSZ), seed=1, normalise=False)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    return {"ckpt": ckpt, "model": model, "files": files, "x": x.numpy(), "ref": ref, "meta": meta}


def _conv_layers(model: nn.Module) -> int:
    """Number of conv/linear layers of the fused model (L in the tolerance derivations)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


@needs_converter
def test_float32_matches_pytorch_and_keeps_metadata(tflite_setup: dict) -> None:
    """Same float32 graph with other kernels: only rounding differs, so checkpoint_tol (eps32-derived, conftest) applies."""
    s = tflite_setup
    runner = TfliteRunner(s["files"]["fp32"])
    assert runner.input_shape == (1, 3, *IMGSZ)
    assert runner.input["dtype"] == np.float32
    y = runner(s["x"])  # batch 2 through a batch-1 model: run image by image
    assert y.shape == s["ref"].shape
    assert_close_predictions(y, s["ref"], checkpoint_tol(s["ckpt"]))
    meta = read_tflite_metadata(s["files"]["fp32"])
    assert meta == runner.metadata
    assert meta["names"] == ["a", "b", "c"] and meta["imgsz"] == list(IMGSZ) and meta["stride"] == s["meta"]["stride"]
    assert meta["quant"] == "fp32" and meta["head"] == "anchor_based" and meta["output_shape"] == [1, *s["ref"].shape[1:]]


@needs_converter
def test_float16_within_weight_rounding_bound(tflite_setup: dict) -> None:
    """float16 weights, float32 compute on CPU.

    Derivation: rounding a weight to float16 changes it by at most eps16/2 relative, so each layer's output moves by at
    most ~eps16/2 of its scale (typically eps16/sqrt(12*n) as the errors of a length-n dot product partly cancel); with
    BN-calibrated gains ~1 the L layers' errors add at most linearly: eps16/2 * L, doubled for margin = eps16 * L
    (yolov5n: L ~ 60 -> ~0.06; measured 0.008 of the box scale, 0.005 on scores). A wrong layout or a dropped layer is
    whole pixels / 0.1 scores.
    """
    s = tflite_setup
    runner = TfliteRunner(s["files"]["fp16"])
    tol = torch.finfo(torch.float16).eps * _conv_layers(s["model"])
    assert runner.metadata["quant"] == "fp16"
    assert_close_predictions(runner(s["x"]), s["ref"], tol)
    assert s["files"]["fp16"].stat().st_size < 0.6 * s["files"]["fp32"].stat().st_size  # weights stored as float16


def _int8_bound(model: nn.Module, scores: np.ndarray) -> float:
    """RMS error bound of an INT8 model's scores, derived as in tests/test_quantize.py.

    Every int8 tensor rounds to a step of range/255, noise of RMS step/sqrt(12); with MinMax ranges a few times the
    tensors' spread and at most L quantised tensors (one per conv layer) on the longest path adding like a random walk,
    the head's input, and so its (float) conv's logits, are off by RMS <= 4*sqrt(L)/255 of the logits' spread. The
    sigmoid's slope is at most 1/4, so the scores are off by at most a quarter of that.
    """
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    return float(np.sqrt(_conv_layers(model)) / 255 * logits.std())


def _top_box_ious(y: np.ndarray, ref: np.ndarray, k: int = 20) -> np.ndarray:
    """IoU of each image's top-k float boxes (by obj * best class score) with the INT8 boxes of the same rows."""
    ious = []
    for yi, ri in zip(y, ref):
        top = np.argsort(-(ri[:, 4] * ri[:, 5:].max(1)))[:k]
        a, b = yi[top, :4], ri[top, :4]
        lo = np.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
        hi = np.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
        inter = np.clip(hi - lo, 0, None).prod(1)
        ious.append(inter / (a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter))
    return np.concatenate(ious)


@needs_converter
def test_int8_runner_quantises_input_and_scores_agree(tflite_setup: dict) -> None:
    """int8 input (quantised by the runner), float head and output; scores track float within the int8 bound."""
    s = tflite_setup
    runner = TfliteRunner(s["files"]["int8"])
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.float32  # head decode kept in float
    scale, zero = runner.input["quantization"]
    assert abs(scale - 1 / 255) < 1e-3 / 255 and zero == -128  # calibration images span [0, 1]
    y, ref = runner(s["x"]), s["ref"]
    assert y.shape == ref.shape and y.dtype == np.float32
    rms = float(np.sqrt(((y[..., 4:] - ref[..., 4:]) ** 2).mean()))
    tol = _int8_bound(s["model"], ref[..., 4:])
    assert rms < tol, f"RMS score error {rms:.4f} (bound {tol:.4f})"


@needs_converter
def test_int8_boxes_do_not_collapse(tflite_setup: dict) -> None:
    """INT8 box sizes follow float (quantised end to end, wh of the stride-16/32 rows collapsed to 0).

    Bound: the box logits come out of the same int8 neck as the scores, so each box edge moves by at most
    eps = 4*sqrt(L)/255 (_int8_bound, relative) of the box size; shrinking one box and growing the other by that gives
    IoU >= ((1 - 2 eps) / (1 + 2 eps))^2 (yolov5n, L ~ 60: 0.38; measured mean 0.71, wh correlation 0.97).
    """
    s = tflite_setup
    y, ref = TfliteRunner(s["files"]["int8"])(s["x"]), s["ref"]
    wh, ref_wh = y[..., 2:4].ravel(), ref[..., 2:4].ravel()
    assert (wh < ref_wh / 4).mean() == 0, "INT8 widths/heights collapsed towards 0"
    assert np.corrcoef(np.log(wh), np.log(ref_wh))[0, 1] > 0.9
    eps = 4 * np.sqrt(_conv_layers(s["model"])) / 255
    iou = _top_box_ious(y, ref)
    assert iou.mean() > ((1 - 2 * eps) / (1 + 2 * eps)) ** 2, f"mean IoU of the top boxes {iou.mean():.3f}"


def test_int8_without_calibration_is_one_line_error(tmp_path: Path) -> None:
    """INT8 needs representative images; the error says so before any conversion starts."""
    meta = {"head": "anchor_based"}
    with pytest.raises(ExportError, match="calibration") as e:
        export_tflite(nn.Identity(), tmp_path / "best_int8.tflite", IMGSZ, meta, "int8", None)
    assert "\n" not in str(e.value)


def test_bad_quant_and_calibration_shape_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="quant"):
        export_tflite(nn.Identity(), tmp_path / "x.tflite", IMGSZ, {}, "int4")
    with pytest.raises(ExportError, match="calibration images must be"):
        export_tflite(nn.Identity(), tmp_path / "x.tflite", IMGSZ, {}, "int8", [np.zeros((3, 32, 32), np.float32)])


def test_missing_converter_names_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(ExportError, match="pip install .*onnx2tf") as e:
        export_tflite(nn.Identity(), tmp_path / "x.tflite", IMGSZ, {}, "fp32")
    assert "\n" not in str(e.value) and "onnx2tf" in str(e.value).split(":")[0]
    assert not (tmp_path / "x.tflite").exists()


def test_file_names() -> None:
    names = [tflite_filename("best", q) for q in ("fp32", "fp16", "int8")]
    assert names == ["best_float32.tflite", "best_float16.tflite", "best_int8.tflite"]


@needs_converter
def test_export_py_and_backend_run_tflite(tflite_setup: dict, tmp_path: Path) -> None:
    """export.py --include tflite writes best_float32.tflite next to the weights and DetectBackend runs it like the .pt."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    ckpt = Path(tflite_setup["ckpt"])
    (path,) = export_model(weights=ckpt, include=["tflite"], imgsz=list(IMGSZ), output=tmp_path / "m.tflite")
    backend = DetectBackend(path)
    assert backend.format == "tflite" and backend.fixed_imgsz == IMGSZ and backend.names == DetectBackend(ckpt).names
    out = backend(torch.from_numpy(tflite_setup["x"])).numpy()
    assert_close_predictions(out, tflite_setup["ref"], checkpoint_tol(ckpt))



@needs_converter
def test_segmentation_float32_matches_pt(tmp_path: Path) -> None:
    """Both segmentation outputs come back in the .pt's order and layout (prototypes NCHW, though onnx2tf makes them NHWC
    and may reorder the outputs), each within checkpoint_tol (float32 rounding, conftest) of the .pt's."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    weights = make_checkpoint(tmp_path / "best.pt", "yolov5n-seg.yaml")
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=list(IMGSZ))
    backend = DetectBackend(path)
    assert path.name == "best_float32.tflite" and backend.task == "segment" and backend.fixed_imgsz == IMGSZ
    assert_segmentation_parity(backend, weights, IMGSZ)


def _image_folder(folder: Path, n: int) -> Path:
    """`n` noise images (PNG, 48x80) in `folder`, as calibration images for --data."""
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        arr = (random_images((3, 48, 80), seed=200 + i, normalise=False).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr.transpose(1, 2, 0)).save(folder / f"{i}.png")
    return folder


@needs_converter
def test_segmentation_int8_keeps_both_outputs_float(tmp_path: Path) -> None:
    """--int8 on a segmentation model: int8 input; the detect convs and the prototypes' last conv stay float, so both
    outputs are float32. On held-out shapes images, the mask coefficients and the prototypes' pre-activation z stay within
    the rounding bound of the ONNX Runtime INT8 file of the same model (tests/test_quantize.py): TFLite rounds the same
    tensors (each body op's output once; weights per channel at 8 bits, finer than ORT's 7). Prototypes are SiLU(z), and
    SiLU's slope is at most 1.1. Scores as in test_int8_runner_quantises_input_and_scores_agree."""
    from tests.test_quantize import _rounding_bound
    from utils.export.exporter import export_model
    from utils.export.quantize import letterboxed_images
    from utils.runtime.backend import DetectBackend

    weights = make_checkpoint(tmp_path / "best.pt", "yolov5n-seg.yaml")
    data = tiny_shapes_yaml(tmp_path, n_train=16, n_val=4, seed=0)
    tfl, ort_int8 = export_model(weights=weights, include=["tflite", "onnx"], imgsz=list(IMGSZ), int8=True, data=data)
    runner = TfliteRunner(tfl)
    assert tfl.name == "best_int8.tflite" and runner.input["dtype"] == np.int8
    assert [o["dtype"] for o, _ in runner.outputs] == [np.float32, np.float32]
    model = load_model(weights).fuse()
    z: list[torch.Tensor] = []
    model.model[-1].proto.cv3.conv.register_forward_hook(lambda m, i, o: z.append(o))
    x = torch.from_numpy(np.stack(list(letterboxed_images(sorted((tmp_path / "shapes/images/val").glob("*.jpg")), IMGSZ))))
    with torch.no_grad():
        ref, ref_protos = (t.numpy() for t in DetectBackend(weights)(x))
        model(x)
        got, got_protos = (t.numpy() for t in DetectBackend(tfl)(x))
    assert got.shape == ref.shape and got_protos.shape == ref_protos.shape
    tol = _rounding_bound(ort_int8)
    scores, coefficients = slice(4, 8), slice(8, None)  # obj + 3 classes, then the 32 mask coefficients
    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).mean()))

    errors = {
        "scores": rms(got[..., scores], ref[..., scores]) / _int8_bound(model, ref[..., scores]),
        "coefficients": rms(got[..., coefficients], ref[..., coefficients]) / float(ref[..., coefficients].std()) / tol,
        "prototypes": rms(got_protos, ref_protos) / float(torch.cat(z).std()) / (1.1 * tol),
    }
    assert all(e < 1 for e in errors.values()), errors


@pytest.mark.slow  # one more INT8 conversion, ~25 s on 2 cores
@needs_converter
def test_export_py_int8_calibrates_on_data_images(tflite_setup: dict, tmp_path: Path) -> None:
    """export.py --include tflite --int8 --data <images> writes best_int8.tflite; DetectBackend runs it with float boxes."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    folder = _image_folder(tmp_path / "images", 4)
    ckpt = Path(tflite_setup["ckpt"])
    weights = tmp_path / "best.pt"
    weights.write_bytes(ckpt.read_bytes())
    (path,) = export_model(weights=weights, include=["tflite"], imgsz=list(IMGSZ), int8=True, data=folder)
    assert path == tmp_path / "best_int8.tflite" and read_tflite_metadata(path)["quant"] == "int8"
    backend = DetectBackend(path)
    out = backend(torch.from_numpy(tflite_setup["x"])).numpy()
    assert out.shape == tflite_setup["ref"].shape and (out[..., 2:4] > 0).all()
    assert _top_box_ious(out, tflite_setup["ref"]).mean() > 0.3


def test_converter_failure_names_the_converter_error() -> None:
    """A failed TFLiteConverter run is reported by MLIR's error line (the op it stopped at), not its last output line."""
    from utils.export.tflite import _converter_error

    output = ("I0000 loader.cc:220] Running initialization op\n"
              "loc(callsite(fused[\"Erf:\", \"model/tf.math.erf/Erf\"])): error: 'tf.Erf' op is neither a custom op nor a flex op\n"
              "}) {tf.entry_function = {control_outputs = \"\"}}\n")  # fmt: skip
    assert _converter_error(output, 1) == "'tf.Erf' op is neither a custom op nor a flex op"
    assert _converter_error("first\nlast line\n", 1) == "last line"
    assert _converter_error("", 3) == "exit code 3"
