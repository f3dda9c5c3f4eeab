"""NCNN runner: an exported *_ncnn_model/ folder (model.ncnn.param, model.ncnn.bin, metadata.yaml) run on the CPU.

NCNN blobs have no batch axis, so the runner runs a batch image by image. PNNX folds the head's anchor grids into
constants at export, so the input size is the one recorded in metadata.yaml (static, like a non-dynamic ONNX export).
A graph with several outputs (a segmentation model's detections and prototypes) returns them in PNNX's out0, out1 order.
A graph ending in ncnn's DetectionOutput layer (export.py --nms) did its NMS inside; its rows [label, score, x1, y1, x2, y2]
(label 0 is the background) are reordered to the (topk_all, 6) [x1, y1, x2, y2, score, class] end-to-end layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import yaml

from utils.runtime.openvino import OPENVINO_METADATA
from utils.runtime.packages import import_optional

PARAM_FILE, BIN_FILE = "model.ncnn.param", "model.ncnn.bin"
NCNN_METADATA = OPENVINO_METADATA  # the same metadata.yaml sidecar as the OpenVINO folder
NMS_LAYER = "DetectionOutput"  # ncnn's per-class NMS layer, the last layer of an export.py --nms graph
PARAM_MAGIC = "7767517"  # first line of a text .param file (ncnn's param format)
# Options that let ncnn store or compute in 16 bits on CPUs that support it; off so the runner matches PyTorch's fp32.
REDUCED_PRECISION_OPTIONS = (
    "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed",
)  # fmt: skip


class NcnnImportError(ImportError):
    """The ncnn package is missing; one-line message with the pip command."""


def import_ncnn() -> Any:
    """The ncnn package, or a one-line NcnnImportError with the install hint."""
    return import_optional("ncnn", "NCNN inference", "pip install ncnn", error=NcnnImportError)


def read_param(param: Path) -> tuple[list[tuple[str, list[str], list[str]]], list[str], list[str]]:
    """Parse a text .param: ([(type, bottoms, tops)], input blob names, output blob names); one-line ValueError if bad.

    Format (ncnn wiki, param-and-model-file-structure): magic, 'layer_count blob_count', then one line per layer:
    'type name n_bottoms n_tops bottom... top... key=value...'. Inputs are the tops of Input layers; outputs are tops
    no layer consumes.
    """
    try:
        lines = [s.split() for s in Path(param).read_text(encoding="utf-8").splitlines() if s.strip()]
        if not lines or lines[0] != [PARAM_MAGIC] or len(lines) < 2:
            raise ValueError(f"first line is not the magic number {PARAM_MAGIC}")
        layers = []
        for tok in lines[2 : 2 + int(lines[1][0])]:
            nb, nt = int(tok[2]), int(tok[3])
            layers.append((tok[0], tok[4 : 4 + nb], tok[4 + nb : 4 + nb + nt]))
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ValueError(f"{param}: not a readable NCNN .param file ({reason})") from None
    consumed = {b for _, bottoms, _ in layers for b in bottoms}
    inputs = [t for kind, _, tops in layers if kind == "Input" for t in tops]
    outputs = [t for _, _, tops in layers for t in tops if t not in consumed]
    return layers, inputs, outputs


def find_param(path: Union[str, Path]) -> Path:
    """The .param file of an NCNN folder (model.ncnn.param preferred) or the given .param; one-line errors name the path."""
    path = Path(path)
    if path.is_dir():
        params = sorted(path.glob("*.param"))
        preferred = [p for p in params if p.name == PARAM_FILE]
        if not params:
            raise FileNotFoundError(f"{path}: no NCNN .param file in this folder")
        return (preferred or params)[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: NCNN model not found")
    if path.suffix != ".param":
        raise ValueError(f"{path}: not an NCNN model (expected a *_ncnn_model/ folder or a .param file)")
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    """metadata.yaml beside the .param as a dict ({} when absent); a malformed file is a one-line ValueError."""
    if not path.is_file():
        return {}
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: unreadable NCNN metadata ({type(e).__name__})") from None
    return meta if isinstance(meta, dict) else {}


def _output_order(name: str) -> tuple[int, str]:
    """Sort key of an output blob: PNNX names a graph's outputs out0, out1, ... in the traced module's order."""
    index = name[3:] if name.startswith("out") else ""
    return (int(index), name) if index.isdigit() else (1 << 30, name)


def final_rows(out: np.ndarray, k: int) -> np.ndarray:
    """DetectionOutput's (n, 6) [label, score, x1, y1, x2, y2] rows (label 0: background) -> (k, 6) [x1, y1, x2, y2,
    score, class], zero rows past the n detections (an image without detections gives an empty Mat: all zeros)."""
    rows = np.zeros((k, 6), np.float32)
    out = np.asarray(out, np.float32).reshape(-1, 6)[:k]
    rows[: len(out)] = out[:, [2, 3, 4, 5, 1, 0]]
    rows[: len(out), 5] -= 1.0
    return rows


def _keep_top_k(param: Path) -> int | None:
    """The rows per image the DetectionOutput layer keeps (its parameter 3, keep_top_k), or None where not written."""
    for line in param.read_text(encoding="utf-8").splitlines():
        if line.startswith(NMS_LAYER):
            values = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            return int(values["3"]) if values.get("3", "").isdigit() else None
    return None


def _static_shape(meta: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(1, 3, h, w) from the metadata's imgsz (the size the grids were folded for), or None when unknown."""
    size = meta.get("imgsz")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return 1, 3, int(size[0]), int(size[1])
    return None


class NcnnRunner:
    """Run an exported NCNN folder on the CPU: (B, 3, H, W) float32 0-1 images -> the PyTorch ExportModel's output layout.

    fp16/bf16 storage and arithmetic are switched off, so NCNN computes in fp32 like PyTorch and parity is fp32 rounding
    (on x86 they are unused anyway; on ARM they would add ~1e-3 relative error per layer).
    """

    def __init__(self, path: Union[str, Path], threads: int | None = None) -> None:
        self._ncnn = import_ncnn()
        self.path = Path(path)
        self.param_file = find_param(self.path)
        self.bin_file = self.param_file.with_suffix(".bin")  # model.ncnn.param -> model.ncnn.bin
        if not self.bin_file.is_file():
            raise FileNotFoundError(f"{self.bin_file}: NCNN weights not found")
        layers, inputs, outputs = read_param(self.param_file)
        if len(inputs) != 1 or not outputs:
            raise ValueError(f"{self.param_file}: expected one Input layer and an output blob, got inputs {inputs} outputs {outputs}")
        self.output_names = sorted(outputs, key=_output_order)
        self.input_name, self.output_name = inputs[0], self.output_names[0]
        self.metadata: dict[str, Any] = _read_metadata(self.param_file.parent / NCNN_METADATA)
        nms = self.metadata.get("nms")
        nms = nms if isinstance(nms, dict) else {}
        tops = {t for kind, _, layer_tops in layers if kind == NMS_LAYER for t in layer_tops}
        # rows per image of an in-graph NMS output (--topk-all; without metadata, the layer's default keep_top_k)
        self.nms_rows: int | None = None
        if self.output_name in tops:
            self.nms_rows = _keep_top_k(self.param_file) or int(nms.get("topk_all") or 100)
        self.input_shape: tuple[int, ...] | None = _static_shape(self.metadata)
        self.net = self._load_net(threads)

    def _load_net(self, threads: int | None) -> Any:
        """An ncnn.Net with fp32-only options and `threads` CPU threads (None: ncnn's default), loaded from the files."""
        net = self._ncnn.Net()
        opt = net.opt
        for name in REDUCED_PRECISION_OPTIONS:
            if hasattr(opt, name):
                setattr(opt, name, False)
        opt.use_vulkan_compute = False
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            opt.num_threads = int(threads)
        if net.load_param(str(self.param_file)) != 0:
            raise ValueError(f"{self.param_file}: ncnn cannot load this .param (unknown layer or bad format)")
        if net.load_model(str(self.bin_file)) != 0:
            raise ValueError(f"{self.bin_file}: ncnn cannot load these weights (truncated, or from another .param)")
        return net

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """(B, 3, H, W) float32 0-1 -> the exported outputs batched, one image at a time: the head's output ((B, N, 5+nc)
        or (B, 4+nc, N); with --nms (B, topk_all, 6)), or a tuple of outputs for a graph with several (segmentation)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1:
            raise ValueError(f"{self.path}: expected a (B, 3, H, W) image batch with B >= 1, got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[2:]) != tuple(self.input_shape[2:]):
            h, w = self.input_shape[2:]
            raise ValueError(f"{self.path}: exported for {h}x{w} images, got {x.shape[2]}x{x.shape[3]}; re-export or use --imgsz {h} {w}")
        per_image = [self._run_one(np.ascontiguousarray(im)) for im in x]
        outputs = tuple(np.stack(group) for group in zip(*per_image))
        return outputs[0] if len(outputs) == 1 else outputs

    def _run_one(self, im: np.ndarray) -> list[np.ndarray]:
        """One (3, H, W) image through the net, each output; the output Mats are copied before the extractor frees them."""
        ex = self.net.create_extractor()
        try:
            ex.input(self.input_name, self._ncnn.Mat(im))  # the Mat shares im's memory: im stays alive until extract returns
            outs = []
            for name in self.output_names:
                ret, out = ex.extract(name)
                if ret != 0:
                    raise RuntimeError(f"{self.param_file}: ncnn failed to compute '{name}' (error {ret})")
                # an empty Mat (DetectionOutput found nothing) has no buffer: converting it would crash the bindings
                outs.append(np.zeros(0, np.float32) if out.empty() else np.array(out, dtype=np.float32, copy=True))
            if self.nms_rows is not None:
                outs[0] = final_rows(outs[0], self.nms_rows)
            return outs
        finally:
            ex.clear()
