"""INT8 static quantisation (utils/export/quantize.py): QDQ that ONNX Runtime fuses, predictions that track float, options."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.model import DetectionModel
from tests.conftest import calibrate_bn, tiny_shapes_yaml
from utils.export.formats import export_onnx_model
from utils.export.quantize import (
    QuantizeError,
    _calibration_reader,
    _letterboxed_chw,
    _strided_chunk,
    calibration_images,
    dequantize_quantize_pairs,
    float_tail_nodes,
    optimized_graph,
    quantize_onnx,
)

IMGSZ = 64
V5, AF = "yolov5n.yaml", "yolov5_mobilenetv4_anchor_free.yaml"  # anchor-based SiLU CSP net; MobileNetV4 (ReLU) + DFL head


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """(calibration images: the train split, held-out images: the val split) of a small generated shapes dataset."""
    root = tmp_path_factory.mktemp("shapes")
    data = tiny_shapes_yaml(root, n_train=16, n_val=4, seed=0)
    return calibration_images(data), sorted((root / "shapes" / "images" / "val").glob("*.jpg"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, shapes: tuple[list[Path], list[Path]]) -> dict[str, tuple[Path, Path]]:
    """{cfg: (fp32 ONNX, default INT8 ONNX)} of BN-calibrated 3-class detectors at IMGSZ (fixed seed)."""
    import torch

    out = tmp_path_factory.mktemp("models")
    pairs = {}
    for cfg in (V5, AF):
        torch.manual_seed(0)
        model = DetectionModel(cfg, nc=3)
        calibrate_bn(model, (8, 3, IMGSZ, IMGSZ), normalise=False)
        model.fuse()
        fp32 = export_onnx_model(model, out / f"{Path(cfg).stem}.onnx", (IMGSZ, IMGSZ))
        pairs[cfg] = (Path(fp32), quantize_onnx(fp32, out / f"{Path(cfg).stem}_int8.onnx", shapes[0], IMGSZ))
    return pairs


def _batch(paths: list[Path]) -> np.ndarray:
    """Held-out images letterboxed to IMGSZ the way calibration saw them, as one NCHW float32 batch."""
    arrays = [_letterboxed_chw(p, (IMGSZ, IMGSZ)) for p in paths]
    assert all(a is not None for a in arrays)
    return np.stack([a for a in arrays if a is not None])


def _run_all(path: Path, x: np.ndarray, config: dict[str, str] | None = None) -> list[np.ndarray]:
    """Every output of an ONNX model, one image at a time (static batch 1), concatenated over the batch."""
    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    return [np.concatenate(outs) for outs in zip(*runs)]


def _run(path: Path, x: np.ndarray, config: dict[str, str] | None = None) -> np.ndarray:
    """Predictions (images, anchors, 4 box + scores) of an ONNX model, one image at a time (static batch 1)."""
    y = _run_all(path, x, config)[0]
    return y if y.shape[1] > y.shape[2] else y.transpose(0, 2, 1)  # the anchor-free head is channels-first


ACTIVATION_NOISE = 4 / 255  # RMS rounding noise of one uint8 QuantizeLinear, in stds of its tensor (derivation below)


def _weight_noise(q: np.ndarray) -> float:
    """RMS relative noise that rounding a conv's weights to the integers `q` adds to its output (derivation below)."""
    return 1 / (2 * float(np.abs(q).max()))


def _rounding_bound(path: Path) -> float:
    """sqrt of the largest sum, over input-to-output paths, of the squared noise of each rounding on the path."""
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}

    def own(node: onnx.NodeProto) -> float:
        if node.op_type == "QuantizeLinear":
            return ACTIVATION_NOISE**2
        weight = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in inits:
            return _weight_noise(onnx.numpy_helper.to_array(inits[weight.input[0]])) ** 2
        return 0.0

    @functools.cache
    def variance(tensor: str) -> float:
        node = producer.get(tensor)
        if node is None:
            return 0.0
        return max((variance(i) for i in node.input if i), default=0.0) + own(node)

    return float(np.sqrt(max(variance(o.name) for o in proto.graph.output)))


def _logit(p: np.ndarray) -> np.ndarray:
    """Inverse sigmoid: scores back to the head's linear outputs, where quantisation noise adds."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


@pytest.mark.parametrize("cfg", [V5, AF])
def test_ort_runs_every_body_conv_and_silu_quantised(models: dict[str, tuple[Path, Path]], cfg: str) -> None:
    """U8S8 QDQ fuses into QLinearConv / QLinearSigmoid / QLinearMul: only the float tail's convs and sigmoids stay float."""
    fp32, int8 = models[cfg]
    proto = onnx.load(str(fp32))
    tail = set(float_tail_nodes(proto))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    tail_convs = sum(n.name in tail for n in convs)
    tail_sigmoids = sum(n.op_type == "Sigmoid" and n.name in tail for n in proto.graph.node)
    ops = Counter(n.op_type for n in optimized_graph(int8).graph.node)
    assert tail_convs == (3 if cfg == V5 else 7)  # one 1x1 conv per level (anchor-based); box + class per level + DFL
    assert ops["QLinearConv"] + ops["ConvInteger"] == len(convs) - tail_convs
    assert ops["Conv"] + ops["FusedConv"] == tail_convs
    assert ops["Sigmoid"] == tail_sigmoids and ops["QLinearSigmoid"] > 0
    assert ops["QLinearSoftmax"] == 0  # the DFL softmax is decode: float
    assert dequantize_quantize_pairs(onnx.load(str(int8))) == []


@pytest.mark.parametrize("cfg", [V5, AF])
def test_int8_predictions_track_float(models: dict[str, tuple[Path, Path]], shapes: tuple[list[Path], list[Path]], cfg: str) -> None:
    """Boxes and score logits of held-out images stay within the rounding noise that the int8 roundings accumulate.

    Bound, in stds of each output: every QuantizeLinear rounds to a step of range/255 (uint8), noise of RMS step/sqrt(12);
    MinMax ranges of these BN-calibrated (unit-gain) tensors span at most ~14 std, so each adds at most 4/255 of a std.
    Every quantised conv weight is rounded to a step of max|w|/q (symmetric, q = 64 for 7-bit weights), noise of RMS
    step/sqrt(12) per weight, against the weights' own RMS of max|w|/sqrt(3) (uniform initialisation, per output
    channel): the conv's output carries 1/(2q) of its std. Independent roundings on a path add like a random walk: the
    RMS error is at most the square root of the sum of their squares on the worst path (0.19-0.21 here; measured
    0.02-0.13). A mis-scaled or saturating quantisation gives errors of order 1.
    """
    fp32, int8 = models[cfg]
    x = _batch(shapes[1])
    ref, got = _run(fp32, x), _run(int8, x)
    tol = _rounding_bound(int8)
    box_err = np.sqrt(((got[..., :4] - ref[..., :4]) ** 2).mean()) / ref[..., :4].std()
    logit_err = np.sqrt(((_logit(got[..., 4:]) - _logit(ref[..., 4:])) ** 2).mean()) / _logit(ref[..., 4:]).std()
    assert box_err < tol and logit_err < tol, (box_err, logit_err, tol)


@pytest.mark.parametrize("cfg", [V5, AF])
def test_int8_file_computes_the_same_as_without_saturation(models: dict[str, tuple[Path, Path]], shapes: tuple[list[Path], list[Path]],
                                                           cfg: str) -> None:
    """ONNX Runtime's saturation-free int8 path (session.x64quantprecision: exact u8u8 sums on x86 CPUs without VNNI,
    what VNNI CPUs compute anyway) gives bit-identical predictions: integer sums are exact on both paths, so any
    difference is saturation in the default kernels (up to 80 px in a box with 8-bit weights on an AVX2 CPU)."""
    int8, x = models[cfg][1], _batch(shapes[1])
    assert np.array_equal(_run(int8, x), _run(int8, x, {"session.x64quantprecision": "1"}))


@pytest.mark.parametrize("cfg", [V5, AF])
def test_int8_weights_cannot_saturate_any_x86_kernel(models: dict[str, tuple[Path, Path]], cfg: str) -> None:
    """Every quantised conv weight lies in [-64, 64]: x86 int8 kernels without VNNI add two uint8 x int8 products into a
    saturating int16, and 2 * 255 * 64 = 32640 fits in it, so the file computes the same with and without VNNI."""
    weights = _conv_weights(models[cfg][1])
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64 for w in weights)


def _weight_dequantizers(path: Path) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The DequantizeLinear nodes feeding Conv weights of an INT8 QDQ model, and the model's initializers."""
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    dqs = [producer[n.input[1]] for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in producer]
    return [dq for dq in dqs if dq.op_type == "DequantizeLinear"], inits


def _conv_weight_scales(path: Path) -> list[np.ndarray]:
    """The DequantizeLinear scales of every quantised Conv weight of an INT8 QDQ model."""
    dqs, inits = _weight_dequantizers(path)
    return [inits[dq.input[1]] for dq in dqs]


def _conv_weights(path: Path) -> list[np.ndarray]:
    """The integer weights of every quantised Conv of an INT8 QDQ model."""
    dqs, inits = _weight_dequantizers(path)
    return [inits[dq.input[0]] for dq in dqs]


def test_per_tensor_option_gives_scalar_weight_scales(
    models: dict[str, tuple[Path, Path]], shapes: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    fp32, per_channel = models[V5]
    per_tensor = quantize_onnx(fp32, tmp_path / "pt.onnx", shapes[0], IMGSZ, per_channel=False)
    channel_scales, tensor_scales = _conv_weight_scales(per_channel), _conv_weight_scales(per_tensor)
    assert len(tensor_scales) == len(channel_scales) == 57  # every body conv of yolov5n (60 less 3 float head convs)
    assert all(s.ndim == 0 for s in tensor_scales)
    assert all(s.ndim == 1 and s.size > 1 for s in channel_scales)
    assert Counter(n.op_type for n in optimized_graph(per_tensor).graph.node)["QLinearConv"] == 57


def test_dfl_softmax_and_decode_stay_float(models: dict[str, tuple[Path, Path]]) -> None:
    """The anchor-free DFL (softmax over 16 bins, fixed-weight conv) is box decode: excluded from quantisation."""
    fp32, int8 = models[AF]
    tail = set(float_tail_nodes(onnx.load(str(fp32))))
    proto = onnx.load(str(int8))
    producer = {o: n for n in proto.graph.node for o in n.output}
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    dfl = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[0] in producer and producer[n.input[0]].op_type == "Softmax"]
    assert len(softmax) == len(dfl) == 1 and {softmax[0].name, dfl[0].name} <= tail
    assert all(producer[i].op_type != "DequantizeLinear" for n in softmax + dfl for i in n.input if i in producer)


def test_keep_float_ops_leaves_silu_float(
    models: dict[str, tuple[Path, Path]], shapes: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    fp32, _ = models[V5]
    int8 = quantize_onnx(fp32, tmp_path / "fsilu.onnx", shapes[0], IMGSZ, keep_float_ops=("Sigmoid", "Mul"))
    proto = onnx.load(str(int8))
    sigmoids = [n for n in proto.graph.node if n.op_type == "Sigmoid"]
    assert sigmoids and not any(_feeds_quantize(proto, n) for n in sigmoids)  # x * sigmoid(x) computed in float
    ops = Counter(n.op_type for n in optimized_graph(int8).graph.node)
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == 0 and ops["QLinearConv"] == 57  # conv outputs are still quantised


def _feeds_quantize(proto: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """Whether any consumer of node's output is a QuantizeLinear."""
    return any(n.op_type == "QuantizeLinear" and node.output[0] in n.input for n in proto.graph.node)


@pytest.mark.parametrize("kw", [{"calibrate_method": "entropy"}, {"calibrate_method": "percentile"}, {"activation_type": "int8"}])
def test_other_calibrations_and_int8_activations_track_float(
    models: dict[str, tuple[Path, Path]], shapes: tuple[list[Path], list[Path]], tmp_path: Path, kw: dict
) -> None:
    fp32, _ = models[V5]
    int8 = quantize_onnx(fp32, tmp_path / "q.onnx", shapes[0][:8], IMGSZ, **kw)
    x = _batch(shapes[1])
    ref, got = _run(fp32, x), _run(int8, x)
    tol = _rounding_bound(int8)  # as in test_int8_predictions_track_float
    assert np.sqrt(((got[..., :4] - ref[..., :4]) ** 2).mean()) / ref[..., :4].std() < tol


@pytest.mark.parametrize("kw", [{"activation_type": "uint4"}, {"calibrate_method": "MinMax"}])
def test_unknown_option_fails_before_any_work(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(QuantizeError, match=next(iter(kw))):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", [], IMGSZ, **kw)
    assert not list(tmp_path.iterdir())


def test_calibration_reader_is_lazy_strided_and_skips_unreadable(
    shapes: tuple[list[Path], list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        reader = _calibration_reader("images", [*shapes[0][:5], bad], (32, 48), batch=2)
    assert any("1 of 6 calibration images" in r.getMessage() for r in caplog.records)
    assert len(reader) == 2  # 5 readable images -> two whole batches of 2
    reader.set_range(1, 2)
    batch = reader.get_next()
    assert batch is not None and batch["images"].shape == (2, 3, 32, 48) and batch["images"].dtype == np.float32
    assert reader.get_next() is None
    assert [_strided_chunk(n) for n in (1, 5, 30, 61, 64, 300)] == [1, 5, 15, 1, 16, 15]
    with pytest.raises(QuantizeError, match="at least 2 readable"):
        _calibration_reader("images", [bad, shapes[0][0]], (32, 32), batch=2)


@pytest.fixture(scope="module", params=["yolov5n-seg.yaml", "yolov5n_mobileone_s0-seg.yaml", "yolov5_mobilenetv4-seg.yaml"])
def seg_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, shapes: tuple[list[Path], list[Path]]
) -> tuple[Path, Path]:
    """(fp32 ONNX, default INT8 ONNX) of a BN-calibrated 3-class segmentation model at IMGSZ (fixed seed): CSP, MobileOne
    and MobileNetV4 bodies."""
    import torch

    out = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    model = DetectionModel(request.param, nc=3)
    calibrate_bn(model, (8, 3, IMGSZ, IMGSZ), normalise=False)
    model.fuse()
    fp32 = export_onnx_model(model, out / "seg.onnx", (IMGSZ, IMGSZ))
    return Path(fp32), quantize_onnx(fp32, out / "seg_int8.onnx", shapes[0], IMGSZ)


def _output_input_std(proto: onnx.ModelProto, x: np.ndarray, index: int) -> float:
    """Std, over the images `x`, of the first input of the SiLU's Conv that produces graph output `index` (its z)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    mul = producer[proto.graph.output[index].name]
    z = next(i for i in mul.input if producer[i].op_type == "Conv")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(z))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return float(np.concatenate([session.run([z], {name: x[i : i + 1]})[0] for i in range(len(x))]).std())


def test_segmentation_int8_keeps_prototypes_and_coefficients_float(seg_pair: tuple[Path, Path]) -> None:
    """The prototype branch's last conv joins the 3 detect convs in the float tail, on every body family: ONNX Runtime runs
    those 4 convs in float, every other conv quantised, and both outputs (detections with mask coefficients,
    prototypes) are float32."""
    fp32, int8 = seg_pair
    proto = onnx.load(str(fp32))
    producer = {o: n for n in proto.graph.node for o in n.output}
    tail = set(float_tail_nodes(proto))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    tail_convs = [n.name for n in convs if n.name in tail]
    assert len(tail_convs) == 4 and any("proto" in name for name in tail_convs)
    assert producer[proto.graph.output[1].name].name in tail
    ops = Counter(n.op_type for n in optimized_graph(int8).graph.node)
    assert ops["QLinearConv"] == len(convs) - 4 and ops["Conv"] + ops["FusedConv"] == 4
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]


@pytest.mark.parametrize("seg_pair", ["yolov5n-seg.yaml"], indirect=True)
def test_segmentation_int8_tracks_float(seg_pair: tuple[Path, Path], shapes: tuple[list[Path], list[Path]]) -> None:
    """Boxes, score logits, mask coefficients and prototypes all come out of float convs fed by the int8 body, each within
    the rounding bound derived in test_int8_predictions_track_float (in stds of that output). The prototypes are SiLU(z)
    of their last conv's output z: SiLU's slope is at most 1.1, so their error is at most 1.1 times z's, which the bound
    gives in stds of z. The bound assumes MinMax ranges of at most ~14 std, which this CSP model meets (1 of its 63 conv
    outputs reaches 15.6); random-weight MobileOne-S0 and MobileNetV4 bodies do not (median 22 and 12, up to 50 and 20
    std), so they are checked for structure above and by trained models in docs/export.md."""
    fp32, int8 = seg_pair
    x = _batch(shapes[1])
    (ref, ref_protos), (got, got_protos) = _run_all(fp32, x), _run_all(int8, x)
    assert got.shape == ref.shape and got_protos.shape == ref_protos.shape == (len(x), 32, IMGSZ // 4, IMGSZ // 4)
    tol = _rounding_bound(int8)
    nc = 3
    scores = slice(4, 5 + nc)
    errors = {
        "boxes": np.sqrt(((got[..., :4] - ref[..., :4]) ** 2).mean()) / ref[..., :4].std(),
        "score logits": np.sqrt(((_logit(got[..., scores]) - _logit(ref[..., scores])) ** 2).mean()) / _logit(ref[..., scores]).std(),
        "mask coefficients": np.sqrt(((got[..., 5 + nc :] - ref[..., 5 + nc :]) ** 2).mean()) / ref[..., 5 + nc :].std(),
        "prototypes": np.sqrt(((got_protos - ref_protos) ** 2).mean()) / (1.1 * _output_input_std(onnx.load(str(fp32)), x, 1)),
    }
    assert all(e < tol for e in errors.values()), (errors, tol)
