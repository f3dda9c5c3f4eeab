"""NCNN export (TorchScript traced, converted by PNNX) to a *_ncnn_model/ folder; utils/runtime/ncnn.py runs such folders.

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

import torch
import yaml
from torch import nn

from utils.export.formats import ExportError, ExportModel, atomic_path, import_optional
from utils.runtime.ncnn import BIN_FILE, NCNN_METADATA, PARAM_FILE, read_param


def pnnx_executable() -> Path:
    """The PNNX converter binary shipped in the pnnx pip package, or a one-line ExportError with the install hint."""
    pnnx = import_optional("pnnx", "NCNN export", "pip install pnnx")
    exe = Path(getattr(pnnx, "EXEC_PATH", ""))
    if not exe.is_file():
        raise ExportError(f"{exe}: the pnnx package has no converter binary for this platform; reinstall it: pip install pnnx")
    return exe


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
