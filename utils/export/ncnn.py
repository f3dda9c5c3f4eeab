"""NCNN export (TorchScript traced, converted by PNNX) to a *_ncnn_model/ folder, and a runner for such folders.

The folder holds model.ncnn.param (the graph, text), model.ncnn.bin (the weights) and metadata.yaml. NCNN blobs have
no batch axis, so the graph is converted for one (3, h, w) image and the runner runs a batch image by image. PNNX folds
the head's anchor grids into constants, so the input size is fixed at export (static, like a non-dynamic ONNX export).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import yaml
from torch import nn

from utils.export.formats import OPENVINO_METADATA, ExportError, ExportModel, atomic_path, import_optional

PARAM_FILE, BIN_FILE = "model.ncnn.param", "model.ncnn.bin"
NCNN_METADATA = OPENVINO_METADATA  # the same metadata.yaml sidecar as the OpenVINO folder
PARAM_MAGIC = "7767517"  # first line of a text .param file (ncnn's param format)
# Options that let ncnn store or compute in 16 bits on CPUs that support it; off so the runner matches PyTorch's fp32.
REDUCED_PRECISION_OPTIONS = (
    "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed",
)  # fmt: skip


class NcnnImportError(ImportError):
    """The ncnn package is missing; one-line message with the pip command."""


def pnnx_executable() -> Path:
    """The PNNX converter binary shipped in the pnnx pip package, or a one-line ExportError with the install hint."""
    pnnx = import_optional("pnnx", "NCNN export", "pip install pnnx")
    exe = Path(getattr(pnnx, "EXEC_PATH", ""))
    if not exe.is_file():
        raise ExportError(f"{exe}: the pnnx package has no converter binary for this platform; reinstall it: pip install pnnx")
    return exe


def import_ncnn() -> Any:
    """The ncnn package, or a one-line NcnnImportError with the install hint."""
    return import_optional("ncnn", "NCNN inference", "pip install ncnn", error=NcnnImportError)


def _trace(model: nn.Module, imgsz: tuple[int, int]) -> torch.jit.ScriptModule:
    """TorchScript of the model's export view for one float32 CPU image (PNNX converts on the CPU)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:  # a copy: the caller's model stays where it is
        model = _cpu_float_copy(model)
    im = torch.zeros(1, 3, *imgsz)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        return torch.jit.trace(ExportModel(model), im, strict=False, check_trace=False)


def _cpu_float_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of `model` (deep copy, so shared exports keep their device and dtype)."""
    import copy

    return copy.deepcopy(model).cpu().float().eval()


def _run_pnnx(exe: Path, work: Path, imgsz: tuple[int, int], half: bool) -> tuple[Path, Path]:
    """Convert work/model.pt with PNNX inside `work` (all its scratch files land there); returns the .param/.bin paths."""
    h, w = imgsz
    cmd = [str(exe), "model.pt", f"inputshape=[1,3,{h},{w}]f32", f"fp16={int(half)}", "device=cpu", "optlevel=2"]
    cmd += [f"ncnnparam={PARAM_FILE}", f"ncnnbin={BIN_FILE}"]
    try:
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, errors="replace", check=False)
    except OSError as e:
        raise ExportError(f"{exe}: cannot run the PNNX converter ({e.strerror or e})") from None
    param, weights = work / PARAM_FILE, work / BIN_FILE
    if r.returncode != 0 or not param.is_file() or not weights.is_file():
        lines = [s.strip() for s in (r.stderr + r.stdout).splitlines() if s.strip()]
        detail = lines[-1][:200] if lines else "no output"
        raise ExportError(f"PNNX could not convert the model to NCNN (exit code {r.returncode}): {detail}")
    return param, weights


def _check_layers(param: Path) -> None:
    """Refuse a graph with ops PNNX left unconverted (their types keep a dotted torch name, e.g. torch.xxx, F.xxx)."""
    layers, _, _ = read_param(param)
    left = sorted({kind for kind, _, _ in layers if "." in kind})
    if left:
        raise ExportError(f"PNNX left ops NCNN cannot run: {', '.join(left)}; this model cannot be exported to NCNN")


def export_ncnn(
    model: nn.Module, out_dir: Path, imgsz: tuple[int, int], batch_size: int, metadata: dict, *, half: bool = False
) -> Path:
    """Write a fused eval DetectionModel as an NCNN folder (model.ncnn.param/.bin + metadata.yaml), atomically.

    The graph has no batch axis (NCNN blobs are single images), so any batch_size runs; it is only recorded in the
    metadata. half=True stores the weights as fp16 (PNNX fp16=1: half the .bin size, ~1e-2 relative output error).
    """
    h, w = (int(s) for s in imgsz)
    if h < 1 or w < 1 or int(batch_size) < 1:
        raise ExportError(f"NCNN export needs a positive image size and batch size, got imgsz={tuple(imgsz)} batch={batch_size}")
    exe = pnnx_executable()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="ncnn_export_") as scratch:  # PNNX writes 8 side files: keep them out of sight
        work = Path(scratch)
        _trace(model, (h, w)).save(str(work / "model.pt"))
        param, weights = _run_pnnx(exe, work, (h, w), half)
        _check_layers(param)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            shutil.move(str(param), str(tmp / PARAM_FILE))
            shutil.move(str(weights), str(tmp / BIN_FILE))
            (tmp / NCNN_METADATA).write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
    return out_dir


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

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self._ncnn = import_ncnn()
        self.path = Path(path)
        self.param_file = find_param(self.path)
        self.bin_file = self.param_file.with_suffix(".bin")  # model.ncnn.param -> model.ncnn.bin
        if not self.bin_file.is_file():
            raise FileNotFoundError(f"{self.bin_file}: NCNN weights not found")
        _, inputs, outputs = read_param(self.param_file)
        if len(inputs) != 1 or not outputs:
            raise ValueError(f"{self.param_file}: expected one Input layer and an output blob, got inputs {inputs} outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.metadata: dict[str, Any] = _read_metadata(self.param_file.parent / NCNN_METADATA)
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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 0-1 -> (B, N, 5+nc) or (B, 4+nc, N), the exported head's output, one image at a time."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1:
            raise ValueError(f"{self.path}: expected a (B, 3, H, W) image batch with B >= 1, got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[2:]) != tuple(self.input_shape[2:]):
            h, w = self.input_shape[2:]
            raise ValueError(f"{self.path}: exported for {h}x{w} images, got {x.shape[2]}x{x.shape[3]}; re-export or use --imgsz {h} {w}")
        return np.stack([self._run_one(np.ascontiguousarray(im)) for im in x])

    def _run_one(self, im: np.ndarray) -> np.ndarray:
        """One (3, H, W) image through the net; the output Mat is copied before the extractor frees it."""
        ex = self.net.create_extractor()
        try:
            ex.input(self.input_name, self._ncnn.Mat(im))  # the Mat shares im's memory: im stays alive until extract returns
            ret, out = ex.extract(self.output_name)
            if ret != 0:
                raise RuntimeError(f"{self.param_file}: ncnn failed to compute '{self.output_name}' (error {ret})")
            return np.array(out, dtype=np.float32, copy=True)
        finally:
            ex.clear()
