"""TFLite runner: an exported .tflite file run by LiteRT (ai-edge-litert, else tensorflow.lite) on NCHW float batches.

export.py (utils/export/tflite.py) divides the box channels by the input width/height before conversion, so boxes and
scores share one [0, 1] range, and stores its metadata JSON in the flatbuffer as the Model.metadata entry "mobile_yolo".
The runner reads that entry with the flatbuffers package only, (de)quantises INT8 tensors, restores the PyTorch output
layout and multiplies the boxes back to pixels. A file exported with --nms (metadata "nms") returns the end-to-end
rows (B, topk_all, 6 + nm) [x1, y1, x2, y2, confidence, class, ...], zero rows as padding; their box columns likewise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from models.heads.base import LEGACY_HEAD_KIND, head_class
from utils.runtime.packages import MissingPackageError

METADATA_KEY = "mobile_yolo"  # name of our Model.metadata entry in the flatbuffer
RUNTIME_HINT = "pip install ai-edge-litert"


def box_channel_axis(metadata: dict[str, Any]) -> int:
    """Axis of the (B, ., .) head output that runs over box/score channels: the one its head's `anchor_axis` is not."""
    return 3 - head_class(str(metadata.get("head") or LEGACY_HEAD_KIND)).anchor_axis


def read_tflite_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The "mobile_yolo" metadata dict of a .tflite file ({} if absent), read with the flatbuffers package only."""
    from flatbuffers import encode, number_types, packer, table

    data = bytearray(Path(path).read_bytes())
    model = table.Table(data, encode.Get(packer.uoffset, data, 0))

    def tables(tab: table.Table, field: int) -> list[table.Table]:
        o = tab.Offset(4 + 2 * field)  # vtable slot of schema field `field`
        start = tab.Vector(o) if o else 0
        return [table.Table(data, tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(o) if o else 0)]

    buffers = tables(model, 4)  # Model.buffers
    for entry in tables(model, 6):  # Model.metadata: (name: string, buffer: uint)
        o = entry.Offset(4)
        if not o or entry.String(o + entry.Pos) != METADATA_KEY.encode():
            continue
        b = entry.Offset(6)
        buf = buffers[entry.Get(number_types.Uint32Flags, b + entry.Pos) if b else 0]
        d = buf.Offset(4)  # Buffer.data: [ubyte]
        raw = buf.GetVectorAsNumpy(number_types.Uint8Flags, d).tobytes() if d else b""
        meta = json.loads(raw.decode()) if raw else {}
        return meta if isinstance(meta, dict) else {}
    return {}


def _interpreter_class() -> Any:
    """LiteRT's Interpreter (ai-edge-litert), else tensorflow.lite's, else a one-line MissingPackageError with the hint."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter
    except ImportError:
        raise MissingPackageError(f"TFLite inference needs the LiteRT interpreter: {RUNTIME_HINT}") from None


# Layouts onnx2tf may give an output instead of the ONNX one: (B, C, N) <-> (B, N, C) and NHWC for an NCHW map.
CHANNELS_LAST = {3: (0, 2, 1), 4: (0, 3, 1, 2)}


OutputMatch = tuple[dict[str, Any], Optional[tuple[int, ...]]]  # (interpreter output details, transpose back or None)


def _fits(detail: dict[str, Any], shape: tuple[int, ...]) -> OutputMatch | None:
    """(detail, None) if the output has `shape`, (detail, perm) if it has it after CHANNELS_LAST's transpose, else None."""
    got = tuple(int(v) for v in detail["shape"])
    if got == shape:
        return detail, None
    perm = CHANNELS_LAST.get(len(shape))
    return (detail, perm) if perm is not None and len(got) == len(shape) and tuple(got[i] for i in perm) == shape else None


def match_outputs(details: list[dict[str, Any]], shapes: list[list[int]]) -> list[OutputMatch]:
    """Each expected ONNX output shape's interpreter output and the transpose restoring it (None: as is), matched by shape.

    onnx2tf may reorder the outputs and keep them channels-last, so the interpreter's order says nothing; an output is
    taken for the first shape it fits as is, else the first it fits after CHANNELS_LAST's transpose.
    """
    free: list[dict[str, Any]] = list(details)
    matched: list[OutputMatch] = []
    for shape in shapes:
        exp = tuple(int(v) for v in shape)
        fits = [m for m in (_fits(d, exp) for d in free) if m is not None]
        hit = next((m for m in fits if m[1] is None), fits[0] if fits else None)
        if hit is None:
            raise ValueError(f"TFLite model has no output of shape {list(exp)} (outputs {[list(d['shape']) for d in details]})")
        free = [d for d in free if d is not hit[0]]
        matched.append(hit)
    return matched


class TfliteRunner:
    """Run an exported .tflite on NCHW float [0, 1] batches; returns the PyTorch head layout with boxes in pixels.

    A model with several outputs (a segmentation model's detections and prototypes) returns them as a tuple in the ONNX
    export's order and layout, recorded at export as the metadata's "output_shapes".
    """

    def __init__(self, path: Union[str, Path], num_threads: int | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_tflite_metadata(self.path)
        self.interpreter = _interpreter_class()(model_path=str(self.path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        details = self.interpreter.get_output_details()
        shapes = self.metadata.get("output_shapes")
        self.outputs = match_outputs(details, shapes) if shapes else [(details[0], None)]
        self.output = self.outputs[0][0]  # the head's (boxes) output
        b, h, w, c = (int(v) for v in self.input["shape"])
        self.input_shape = (b, c, h, w)  # NCHW, as the PyTorch model and the other backends take it

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Predictions for a (B, 3, H, W) float batch, B a multiple of the model's batch size; a tuple for several outputs."""
        x = np.asarray(x, dtype=np.float32)
        b = self.input_shape[0]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:] or x.shape[0] % b:
            raise ValueError(f"TFLite model takes (k*{b}, {', '.join(map(str, self.input_shape[1:]))}) batches, got {x.shape}")
        parts = [self._run(x[i : i + b]) for i in range(0, x.shape[0], b)]
        outputs = tuple(np.concatenate(group) for group in zip(*parts))
        return outputs[0] if len(outputs) == 1 else outputs

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """One model-sized batch: NHWC, (de)quantise int tensors, restore the ONNX layouts, boxes back to pixels."""
        x = x.transpose(0, 2, 3, 1)
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        ys = [self._output(detail, perm) for detail, perm in self.outputs]
        ys[0] = self._boxes_to_pixels(ys[0])
        return ys

    def _output(self, detail: dict[str, Any], perm: tuple[int, ...] | None) -> np.ndarray:
        """One output tensor as float32 in the ONNX layout (dequantised, transposed back from channels-last)."""
        y = self.interpreter.get_tensor(detail["index"])
        if np.issubdtype(y.dtype, np.integer):
            scale, zero = detail["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        y = y.astype(np.float32)
        if perm is not None:
            return y.transpose(perm)
        shape = tuple(self.metadata.get("output_shape", y.shape))
        if y.shape != shape and y.ndim == 3 and y.transpose(0, 2, 1).shape == shape:
            y = y.transpose(0, 2, 1)  # a file without "output_shapes": onnx2tf may keep a 3-D output channels-last
        return y

    def _boxes_to_pixels(self, y: np.ndarray) -> np.ndarray:
        """The head output with its box channels multiplied back from [0, 1] to pixels (--nms rows: their first 4 columns)."""
        w, h = self.metadata.get("box_scale", (1, 1))
        axis = 2 if self.metadata.get("nms") else box_channel_axis(self.metadata)
        scale_v = np.ones(y.shape[axis], dtype=np.float32)
        scale_v[:4] = [w, h, w, h]
        return y * (scale_v[None, None, :] if axis == 2 else scale_v[None, :, None])
