"""NCNN export (TorchScript traced, converted by PNNX) to a *_ncnn_model/ folder; utils/runtime/ncnn.py runs such folders.

The folder holds model.ncnn.param (the graph, text), model.ncnn.bin (the weights) and metadata.yaml. NCNN blobs have
no batch axis, so the graph is converted for one (3, h, w) image and the runner runs a batch image by image. PNNX folds
the head's anchor grids into constants, so the input size is fixed at export (static, like a non-dynamic ONNX export).

With --nms the graph ends in ncnn's own DetectionOutput layer (per-class NMS, best rows first): PNNX converts the decoded
boxes and best-class scores (end2end.DetectionOutputInputs), then that layer is appended to the .param. The runner only
reorders its rows to the (topk_all, 6) [x1, y1, x2, y2, score, class] layout of the other end-to-end exports.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn

from models.model import DetectionModel
from utils.export.end2end import DetectionOutputInputs, NMSSettings, RankingInputs
from utils.export.formats import ExportError, ExportModel, atomic_path, import_optional
from utils.runtime.ncnn import BIN_FILE, NCNN_METADATA, NMS_LAYER, PARAM_FILE, read_param

NMS_INPUTS = ("out0", "out1", "out2")  # PNNX's names for DetectionOutputInputs' three outputs


def pnnx_executable() -> Path:
    """The PNNX converter binary shipped in the pnnx pip package, or a one-line ExportError with the install hint."""
    pnnx = import_optional("pnnx", "NCNN export", "pip install pnnx")
    exe = Path(getattr(pnnx, "EXEC_PATH", ""))
    if not exe.is_file():
        raise ExportError(f"{exe}: the pnnx package has no converter binary for this platform; reinstall it: pip install pnnx")
    return exe


def _trace(model: nn.Module, imgsz: tuple[int, int], nms: NMSSettings | None = None) -> tuple[torch.jit.ScriptModule, Any]:
    """TorchScript of the model's export view (with `nms`: DetectionOutputInputs) for one float32 CPU image, and the
    view's output for a zero image (PNNX converts on the CPU)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:  # a copy: the caller's model stays where it is
        model = _cpu_float_copy(model)
    view: nn.Module = ExportModel(model)
    if nms is not None:
        view = DetectionOutputInputs(model, nms)
    elif _ranks_final_rows(model):
        view = RankingInputs(cast(DetectionModel, model))
    im = torch.zeros(1, 3, *imgsz)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        return torch.jit.trace(view, im, strict=False, check_trace=False), view(im)


def _ranks_final_rows(model: nn.Module) -> bool:
    """Whether the model's head outputs final rows by a top-k, which ncnn (no TopK layer) must do in DetectionOutput."""
    return isinstance(model, DetectionModel) and model.head.final_rows_output


def check_nms(settings: NMSSettings) -> None:
    """Refuse, in one line, the --nms options ncnn's DetectionOutput layer cannot express."""
    if settings.agnostic:
        raise ExportError("--agnostic-nms is not available for ncnn: its in-graph NMS (the DetectionOutput layer) suppresses "
                          "within each class only; export without --agnostic-nms")
    if settings.topk_per_class < settings.topk_all:
        raise ExportError(f"--topk-per-class {settings.topk_per_class} below --topk-all {settings.topk_all} is not available for "
                          "ncnn: its DetectionOutput layer caps only the total; pass --topk-per-class >= --topk-all")


def check_nms_model(model: nn.Module) -> None:
    """Refuse, in one line, --nms for a model whose rows carry extra values (a segmentation model's mask coefficients):
    ncnn's DetectionOutput layer writes 6 values per row, so the masks could not be built from its output."""
    head = getattr(model, "head", None)
    nm = int(getattr(head, "nm", 0))
    if nm:
        title = getattr(getattr(head, "policy", None), "title", type(head).__name__)
        raise ExportError(f"--nms is not available for ncnn with {title} models: its in-graph NMS (the DetectionOutput layer) "
                          f"keeps 6 values per row and drops the {nm} mask coefficients; export ncnn without --nms")


def _append_nms(param: Path, settings: NMSSettings, n_boxes: int, n_classes: int) -> None:
    """Append ncnn's DetectionOutput layer (per-class NMS over all n_boxes, the topk_all best rows) to the .param."""
    _, _, outputs = read_param(param)
    if sorted(outputs) != list(NMS_INPUTS):
        raise ExportError(f"PNNX gave the NMS inputs as blobs {outputs}, expected {list(NMS_INPUTS)}; cannot append NMS")
    lines = param.read_text(encoding="utf-8").splitlines()
    layers, blobs = (int(v) for v in lines[1].split())
    lines[1] = f"{layers + 1} {blobs + 1}"
    s = settings  # params: 0 classes incl. background, 1 IoU, 2 candidates per class, 3 rows kept, 4 score threshold
    lines.append(f"{NMS_LAYER} nms 3 1 {' '.join(NMS_INPUTS)} output 0={n_classes + 1} 1={s.iou_thres:.9f} 2={n_boxes} "
                 f"3={s.topk_all} 4={s.conf_thres:.9f}")
    param.write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    model: nn.Module, out_dir: Path, imgsz: tuple[int, int], batch_size: int, metadata: dict, *, half: bool = False,
    nms: NMSSettings | None = None,
) -> Path:
    """Write a fused eval DetectionModel as an NCNN folder (model.ncnn.param/.bin + metadata.yaml), atomically.

    The graph has no batch axis (NCNN blobs are single images), so any batch_size runs; it is only recorded in the
    metadata. half=True stores the weights as fp16 (PNNX fp16=1: half the .bin size, ~1e-2 relative output error).
    With `nms` the graph ends in ncnn's DetectionOutput layer (see the module docstring).
    """
    h, w = (int(s) for s in imgsz)
    if h < 1 or w < 1 or int(batch_size) < 1:
        raise ExportError(f"NCNN export needs a positive image size and batch size, got imgsz={tuple(imgsz)} batch={batch_size}")
    if nms is not None:
        check_nms(nms)
        check_nms_model(model)
    exe = pnnx_executable()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="ncnn_export_") as scratch:  # PNNX writes 8 side files: keep them out of sight
        work = Path(scratch)
        traced, example = _trace(model, (h, w), nms)
        traced.save(str(work / "model.pt"))
        param, weights = _run_pnnx(exe, work, (h, w), half)
        _check_layers(param)
        n_boxes, n_classes = (int(example[1].shape[1]), int(example[1].shape[2]) - 1) if isinstance(example, tuple) else (0, 0)
        if nms is not None:
            _append_nms(param, nms, n_boxes, n_classes)
        elif _ranks_final_rows(model):  # the head's top-k, as a DetectionOutput that suppresses nothing (IoU > 1 never holds)
            k = min(cast(DetectionModel, model).head.max_detections or n_boxes, n_boxes)
            _append_nms(param, NMSSettings(conf_thres=0.0, iou_thres=1.0, topk_per_class=n_boxes, topk_all=k), n_boxes, n_classes)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            shutil.move(str(param), str(tmp / PARAM_FILE))
            shutil.move(str(weights), str(tmp / BIN_FILE))
            (tmp / NCNN_METADATA).write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
    return out_dir
