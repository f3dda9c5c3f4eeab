"""TFLite export (float32, float16, INT8) via ONNX -> onnx2tf (TF SavedModel) -> TFLiteConverter.

Path: the fused model is written to ONNX by formats.export_onnx_model, constant-folded with onnxslim (onnx2tf cannot
convert the head's grid subgraph otherwise), given a Mul that divides box coordinates by the input width/height (boxes
in [0, 1], as in YOLOv5's TF export), then converted to an NHWC SavedModel by onnx2tf in a subprocess and to a .tflite
flatbuffer by tf.lite.TFLiteConverter. The metadata JSON is stored inside the flatbuffer as the Model.metadata entry
"mobile_yolo"; the runner that reads it and runs the file is utils/runtime/tflite.py's TfliteRunner.

INT8 keeps the head's decode in float, as the ONNX INT8 path does (utils/export/quantize.py): the model is calibrated,
then quantised with every op from the outputs back to (and including) the head's last convs denylisted, so the input
and the backbone and neck are int8 and the output is float32. Quantised end to end, the decode's Concat/Reshape/Slice
ops must share one scale between box coordinates and class scores, and box widths and heights collapsed to 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from torch import nn

from utils.export.formats import ExportError, atomic_path, export_onnx_model
from utils.export.onnx2tf_fixes import prepare_for_onnx2tf
from utils.runtime.tflite import METADATA_KEY, box_channel_axis

if TYPE_CHECKING:
    from utils.export.end2end import NMSSettings

QUANT_SUFFIX = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
INSTALL_HINT = "pip install tensorflow==2.21.0 tf-keras==2.21.0 onnx2tf==1.28.8 onnx-graphsurgeon sng4onnx sne4onnx psutil onnxslim"
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf reads this from its cwd, else downloads it


def tflite_filename(stem: str, quant: str) -> str:
    """YOLOv5/YOLOv8-style file name, e.g. best_float32.tflite, best_float16.tflite, best_int8.tflite."""
    if quant not in QUANT_SUFFIX:
        raise ExportError(f"TFLite quant must be one of {sorted(QUANT_SUFFIX)}, got {quant!r}")
    return f"{stem}_{QUANT_SUFFIX[quant]}.tflite"


def check_nms(settings: NMSSettings) -> None:
    """Refuse, in one line, the --nms options the in-graph NMS cannot express: it is one NonMaxSuppressionV5 over
    class-shifted boxes, which caps the total rows only."""
    if settings.topk_per_class < settings.topk_all:
        raise ExportError(f"--topk-per-class {settings.topk_per_class} below --topk-all {settings.topk_all} is not available for "
                          "tflite: its in-graph NMS (one NonMaxSuppressionV5 over class-shifted boxes) caps only the total; "
                          "pass --topk-per-class >= --topk-all")


def check_tflite_export_packages() -> None:
    """Raise a one-line ExportError naming the pip command when a converter package is missing."""
    missing = [m for m in ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "onnxslim") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"TFLite export needs {', '.join(missing)}: {INSTALL_HINT}")


def _normalize_boxes_onnx(src: Path, dst: Path, imgsz: tuple[int, int], channel_axis: int) -> list[list[int]]:
    """Constant-fold `src` and scale its box channels by [1/w, 1/h, 1/w, 1/h] (boxes in [0, 1]); returns the output shapes.

    The first output is the head's (boxes); any further one (a segmentation model's prototypes) is left as it is.

    The scale is applied before the head's last channel Concat (see _scale_concat_inputs), not after it: in an INT8 model
    a Concat of pixel boxes and [0, 1] scores shares one quantisation scale, which would round every score to zero.
    """
    import onnx
    import onnxslim

    proto = onnx.shape_inference.infer_shapes(onnxslim.slim(onnx.load(str(src))))
    out = proto.graph.output[0]
    shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
    if len(shape) != 3 or min(shape) <= 0:
        raise ExportError(f"TFLite export needs a static 3-D head output, got {shape} (export without --dynamic)")
    h, w = imgsz
    scale = np.ones(shape[channel_axis], dtype=np.float32)
    scale[:4] = [1.0 / w, 1.0 / h, 1.0 / w, 1.0 / h]
    _scale_channels(proto, out.name, scale, channel_axis - 3)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output]


def _tensor_shapes(proto: Any) -> dict[str, list[int]]:
    """Static shapes of the graph's tensors (inputs, outputs, shape-inferred intermediates)."""
    infos = [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in infos}


def _scale_channels(proto: Any, name: str, scale: np.ndarray, axis: int) -> None:
    """Multiply tensor `name` by `scale` along `axis` (negative), pushed back through Reshape and Concat nodes.

    Walks from the output towards the head: a Reshape that keeps the channel axis (same size, counted from the end) and a
    Concat over another axis pass the scale to their inputs; a Concat over the channel axis splits it among its inputs.
    Anywhere else a Mul by the scale is inserted after the producing node.
    """
    from onnx import helper

    producers = {o: n for n in proto.graph.node for o in n.output}
    shapes = _tensor_shapes(proto)
    node, shape = producers.get(name), shapes.get(name, [])
    if np.all(scale == 1) or node is None:
        return
    src_shape = shapes.get(node.input[0], []) if node.input else []
    if node.op_type == "Reshape" and len(src_shape) >= -axis and src_shape[axis] == len(scale):
        _scale_channels(proto, node.input[0], scale, axis)
        return
    if node.op_type == "Concat" and len(shape) >= -axis:
        cat_axis = next(a.i for a in node.attribute if a.name == "axis") % len(shape)
        sizes = [shapes.get(i, [0] * len(shape))[cat_axis] for i in node.input]
        if cat_axis != len(shape) + axis:
            for inp in node.input:
                _scale_channels(proto, inp, scale, axis)
            return
        if sum(sizes) == len(scale) and all(sizes):
            offsets = np.cumsum([0, *sizes])
            for i, inp in enumerate(node.input):
                _scale_channels(proto, inp, scale[offsets[i] : offsets[i + 1]], axis)
            return
    bshape = [1] * max(len(shape), -axis)
    bshape[axis] = len(scale)
    raw, const = f"{name}_pixels", f"{name}_box_scale"
    node.output[:] = [raw if o == name else o for o in node.output]
    proto.graph.initializer.append(helper.make_tensor(const, 1, bshape, scale.tolist()))  # 1: FLOAT
    index = list(proto.graph.node).index(node)
    proto.graph.node.insert(index + 1, helper.make_node("Mul", [raw, const], [name], name=f"{name}_normalize"))


def _nhwc_batches(calibration: Iterable[np.ndarray] | None, imgsz: tuple[int, int]) -> list[np.ndarray]:
    """Calibration images (each (3, H, W) or (B, 3, H, W), float [0, 1] at the export size) as single NHWC uint8 images.

    uint8 (x 255, rounded) is what the INT8 model's input quantisation (scale 1/255) sees anyway, at a quarter of the memory.
    """
    images: list[np.ndarray] = []
    for arr in calibration or []:
        a = np.asarray(arr, dtype=np.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[1] != 3 or tuple(a.shape[2:]) != tuple(imgsz):
            raise ExportError(f"TFLite calibration images must be (3, {imgsz[0]}, {imgsz[1]}) float arrays, got {a.shape}")
        images.extend((a.clip(0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)[:, None])
    return images


def _write_onnx2tf_sample(folder: Path, images: list[np.ndarray]) -> None:
    """Write the 20x128x128x3 sample onnx2tf validates with (our images, else fixed noise) so it never downloads one."""
    sample = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
    if images:
        from PIL import Image

        picks = [images[i % len(images)][0] for i in range(20)]
        sample = np.stack([np.asarray(Image.fromarray(p).resize((128, 128)), np.float32) / 255 for p in picks])
    np.save(folder / ONNX2TF_SAMPLE, sample.astype(np.float32))


def _run_onnx2tf(onnx_path: Path, saved_model: Path, workdir: Path) -> None:
    """Convert ONNX to an NHWC TF SavedModel with onnx2tf in a subprocess (it sets process-wide TF/Keras state)."""
    # -rtpo Erf: an Erf that onnx2tf does not fold into a GELU becomes its polynomial erf (Abramowitz-Stegun 7.1.26,
    # error <= 1.5e-7), as TFLite has no builtin Erf and tf.math.erf would need Flex ops (MobileNetV4 hybrid-large's GELU)
    cmd = [sys.executable, "-m", "onnx2tf", "-i", str(onnx_path), "-o", str(saved_model), "-osd", "-nuo", "-v", "error", "-rtpo", "Erf"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not (saved_model / "saved_model.pb").is_file():
        lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln or "ERROR" in ln]
        raise ExportError(f"onnx2tf could not convert {onnx_path.name}: {lines[-1] if lines else f'exit code {r.returncode}'}")


def _convert_saved_model(converter: Any, quant: str, images: list[np.ndarray]) -> bytes:
    """TFLite flatbuffer from a TFLiteConverter: float32, float16 weights, or INT8 (int8 input, float head and output)."""
    import tensorflow as tf

    if quant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quant == "int8":
        return _quantize_int8(converter, images)
    return bytes(converter.convert())


def _quantize_int8(converter: Any, images: list[np.ndarray]) -> bytes:
    """Calibrate on `images` (uint8 NHWC), then quantise all but the float head tail; int8 input, float32 output."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize  # what tf.lite's QuantizationDebugger calls for denylists

    def representative() -> Iterator[list[np.ndarray]]:
        yield from ([im.astype(np.float32) / 255] for im in images)

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter._experimental_calibrate_only = True  # float model + calibration ranges; quantised below
    calibrated = converter.convert()
    tail = float_tail_tensors(calibrated)
    model = mlir_quantize(calibrated, fully_quantize=False, input_data_type=tf.int8, output_data_type=tf.float32,
                          denylisted_nodes=tail)  # fmt: skip
    return bytes(model)


CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
LAYOUT_OPS = ("RESHAPE", "TRANSPOSE")


def float_tail_tensors(model: bytes) -> list[str]:
    """Output tensor names of the ops from the graph outputs back to (and including) the last conv on each path.

    The TFLite twin of quantize.float_tail_nodes: a conv fed (through reshapes/transposes) by a Softmax is the
    anchor-free head's DFL expectation, decode not compute, so the walk continues past it.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    graph = obj.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    kinds = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "") for c in obj.operatorCodes]
    kind = [kinds[op.opcodeIndex] for op in graph.operators]
    producer = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}

    def fed_by_softmax(i: int) -> bool:
        src = producer.get(int(graph.operators[i].inputs[0]))
        while src is not None and kind[src] in LAYOUT_OPS:
            src = producer.get(int(graph.operators[src].inputs[0]))
        return src is not None and kind[src] == "SOFTMAX"

    stack, seen = [int(t) for t in graph.outputs], set()
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        if kind[i] not in CONV_OPS or fed_by_softmax(i):
            stack.extend(int(t) for t in graph.operators[i].inputs if t >= 0)
    return [graph.tensors[t].name.decode() for i in sorted(seen) for t in graph.operators[i].outputs]


def add_tflite_metadata(model: bytes, metadata: dict[str, Any]) -> bytes:
    """Return `model` with `metadata` (JSON) stored as the flatbuffer's Model.metadata entry "mobile_yolo"."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    obj.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(obj.buffers) - 1
    obj.metadata = [m for m in (obj.metadata or []) if m.name != METADATA_KEY.encode()] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def export_tflite(
    onnx_or_model: Union[str, Path, nn.Module],
    out: Union[str, Path],
    imgsz: tuple[int, int],
    metadata: dict[str, Any],
    quant: str = "fp32",
    calibration: Iterable[np.ndarray] | None = None,
    nms: NMSSettings | None = None,
) -> Path:
    """Write one .tflite file (`out`, e.g. best_float32.tflite) from a fused model or its static ONNX; metadata inside.

    With `nms` the graph ends in NMS (utils/export/tflite_nms.py) and returns (B, topk_all, 6 + nm) final rows.
    """
    tflite_filename("best", quant)  # validates quant
    if nms is not None:
        check_nms(nms)
        if quant == "int8":
            raise ExportError("--nms cannot be combined with --int8 yet: quantise the plain model and run NMS outside it")
    images = _nhwc_batches(calibration, imgsz)
    if quant == "int8" and not images:
        raise ExportError("TFLite INT8 export needs calibration images (representative data); pass some images")
    check_tflite_export_packages()
    out = Path(out)
    axis = box_channel_axis(metadata)
    with tempfile.TemporaryDirectory(prefix="tflite_") as work_s, atomic_path(out) as tmp:
        work = Path(work_s)
        src = Path(onnx_or_model) if not isinstance(onnx_or_model, nn.Module) else None
        if src is None:
            src = export_onnx_model(onnx_or_model, work / "model.onnx", imgsz, metadata=metadata)  # type: ignore[arg-type]
        shapes = _normalize_boxes_onnx(src, work / "normalized.onnx", imgsz, axis)
        prepare_for_onnx2tf(work / "normalized.onnx")  # top-k heads: rewrites only the copy onnx2tf reads
        _write_onnx2tf_sample(work, images)
        _run_onnx2tf(work / "normalized.onnx", work / "saved_model", work)
        meta = {**metadata, "format": "tflite", "quant": quant, "output_shape": shapes[0], "output_shapes": shapes,
                "box_scale": [imgsz[1], imgsz[0]]}  # fmt: skip
        _run_tflite_converter(work, quant, images, meta, tmp, nms)
    return out


def _run_tflite_converter(
    work: Path, quant: str, images: list[np.ndarray], meta: dict[str, Any], dst: Path, nms: NMSSettings | None = None
) -> None:
    """Run TFLiteConverter + metadata in a subprocess: TensorFlow in this process would crash a later triton import (LLVM).

    With `nms` the metadata's "nms" entry holds its settings, which makes the subprocess append NMS to the graph;
    without it any "nms" entry of `meta` is dropped, so the file never claims an NMS it lacks.
    """
    meta = {k: v for k, v in meta.items() if k != "nms"}
    if nms is not None:
        meta["nms"] = asdict(nms)
    np.save(work / "calibration.npy", np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8))
    (work / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "utils.export.tflite", str(work.resolve()), quant, str(dst.resolve())]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not dst.is_file():
        raise ExportError(f"TFLiteConverter failed ({quant}): {_converter_error(r.stdout + r.stderr, r.returncode)}")


def _converter_error(output: str, returncode: int) -> str:
    """The converter's own error (MLIR prints "loc(...): error: <what>", e.g. an op TFLite has no kernel for), else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln.split(": error: ", 1)[1] for ln in lines if ": error: " in ln]
    return errors[0][:300] if errors else (lines[-1][:300] if lines else f"exit code {returncode}")


def _converter_main(argv: list[str]) -> None:
    """Subprocess entry: <workdir> <quant> <out.tflite>; reads saved_model/, calibration.npy and metadata.json there."""
    work, quant, dst = Path(argv[0]), argv[1], Path(argv[2])
    images = list(np.load(work / "calibration.npy")[:, None])
    meta = json.loads((work / "metadata.json").read_text(encoding="utf-8"))
    if meta.get("nms"):  # NMS in TF builtin ops after the converted model; the outputs become the final rows
        from utils.export.tflite_nms import nms_converter

        converter, shapes = nms_converter(work / "saved_model", meta)
        meta = {**meta, "output_shape": shapes[0], "output_shapes": shapes}
    else:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(work / "saved_model"))
    dst.write_bytes(add_tflite_metadata(_convert_saved_model(converter, quant, images), meta))


if __name__ == "__main__":
    _converter_main(sys.argv[1:])
