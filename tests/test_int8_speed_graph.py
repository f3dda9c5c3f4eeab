"""What ONNX Runtime runs for an INT8 export, as graph properties (no timing): where the int8 passes go, and that the
graph depends neither on the thread count nor on the run (issue 31: yolov5n's 0.82x, the 0.63-1.24x variance)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from models.model import DetectionModel
from tests.conftest import calibrate_bn, tiny_shapes_yaml
from utils.export.formats import export_onnx_model
from utils.export.quantize import calibration_images, float_tail_nodes, optimized_graph, quantize_onnx

IMGSZ = 64
SILU, RELU = "yolov5n.yaml", "yolov5_mobilenetv4_anchor_free.yaml"  # SiLU everywhere; ReLU backbone + SiLU neck


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Calibration images of a small generated shapes dataset."""
    return calibration_images(tiny_shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=1, seed=0))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{cfg: float ONNX} of BN-calibrated, fused 3-class detectors at IMGSZ (fixed seed)."""
    import torch

    out, paths = tmp_path_factory.mktemp("fp32"), {}
    for cfg in (SILU, RELU):
        torch.manual_seed(0)
        model = DetectionModel(cfg, nc=3)
        calibrate_bn(model, (8, 3, IMGSZ, IMGSZ), normalise=False)
        model.fuse()
        paths[cfg] = Path(export_onnx_model(model, out / f"{Path(cfg).stem}.onnx", (IMGSZ, IMGSZ)))
    return paths


def _ops(path: Path, threads: int = 1) -> Counter:
    """Op counts of the graph ORT's CPU provider runs."""
    return Counter(n.op_type for n in optimized_graph(path, threads).graph.node)


def _body_silus(proto: onnx.ModelProto) -> int:
    """Sigmoid -> Mul pairs (x * sigmoid(x)) outside the float tail."""
    tail, producer = set(float_tail_nodes(proto)), {o: n for n in proto.graph.node for o in n.output}
    return sum(
        n.op_type == "Mul" and n.name not in tail and any(i in producer and producer[i].op_type == "Sigmoid" for i in n.input)
        for n in proto.graph.node
    )


def test_float_silu_is_one_fused_op_int8_silu_two_passes(fp32: dict[str, Path], images: list[Path], tmp_path: Path) -> None:
    """Float ORT fuses each SiLU into one QuickGelu; INT8 runs it as QLinearSigmoid + QLinearMul (a second full pass)."""
    n = _body_silus(onnx.load(str(fp32[SILU])))
    int8 = quantize_onnx(fp32[SILU], tmp_path / "int8.onnx", images, IMGSZ)
    f, q = _ops(fp32[SILU]), _ops(int8)
    assert n == 57 and f["QuickGelu"] == n and f["Sigmoid"] == 3  # the 3 float sigmoids are the decode head's
    assert q["QLinearSigmoid"] == q["QLinearMul"] == n and q["QuickGelu"] == 0 and q["QLinearConv"] == 57


def test_int8_relu_is_absorbed_into_qlinearconv(fp32: dict[str, Path], images: list[Path], tmp_path: Path) -> None:
    """A ReLU costs no int8 pass: its clipping is the uint8 output range of the QLinearConv before it."""
    relus = sum(n.op_type == "Relu" for n in onnx.load(str(fp32[RELU])).graph.node)
    q = _ops(quantize_onnx(fp32[RELU], tmp_path / "int8.onnx", images, IMGSZ))
    assert relus > 0 and q["Relu"] == 0 and q["QLinearLeakyRelu"] == 0 and q["QLinearConv"] > 0


@pytest.mark.parametrize("cfg", [SILU, RELU])
def test_int8_graph_is_the_same_every_export_and_thread_count(fp32: dict[str, Path], images: list[Path], tmp_path: Path, cfg: str) -> None:
    """Quantising twice gives identical files, and ORT runs the same fused graph at 1 and 2 threads: no float conv
    comes and goes with calibration or thread settings (the latency variance is the machine, not the graph)."""
    a, b = (onnx.load(str(quantize_onnx(fp32[cfg], tmp_path / f"{k}.onnx", images, IMGSZ))) for k in "ab")
    arrays = [{t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer} for m in (a, b)]
    assert arrays[0] == arrays[1] and [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    proto = onnx.load(str(fp32[cfg]))
    tail = set(float_tail_nodes(proto))
    tail_convs = sum(n.op_type == "Conv" and n.name in tail for n in proto.graph.node)
    one, two = _ops(tmp_path / "a.onnx", 1), _ops(tmp_path / "a.onnx", 2)
    assert one == two and one["Conv"] + one["FusedConv"] == tail_convs
