"""Export a fused detector to the deployment formats (ONNX, TorchScript, OpenVINO), the engine behind export.py."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

import torch

from models.model import DetectionModel
from models.parse import ModelConfigError
from utils.checkpoint import load_model
from utils.cli import check_int, shell_command
from utils.device import select_device
from utils.export.end2end import NMSSettings
from utils.export.formats import (
    ExportError,
    atomic_path,
    check_export_imgsz,
    export_metadata,
    export_onnx_model,
    export_openvino_model,
    export_torchscript_model,
)
from utils.paths import ROOT
from utils.tasks import task_of

LOGGER = logging.getLogger("mobile_yolo")
FORMATS = ("onnx", "torchscript", "openvino", "ncnn", "tflite", "coreml")
NMS_FORMATS = ("onnx", "torchscript", "openvino", "ncnn", "tflite", "coreml")  # formats whose graph can hold NMS (--nms)
NMS_REFUSALS: dict[str, str] = {}  # format -> the op that blocks --nms there (tried, docs/export.md "Known limits")
INT8_FORMATS = ("onnx", "openvino", "tflite", "coreml")
CPU_HALF_FORMATS = ("tflite", "coreml")  # fp16 weights written from the fp32 model, no CUDA needed


def _build_model(weights: Any, cfg: Any, device: torch.device) -> tuple[DetectionModel, Path]:
    """The model to export (checkpoint or random-weight config) and the default output base path."""
    if weights:
        return load_model(weights, device=device), Path(weights).with_suffix("")
    if not cfg:
        raise ExportError("give --weights (a .pt checkpoint) or --cfg (a model yaml)")
    try:
        model = DetectionModel(cfg)
    except (ModelConfigError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    return model.to(device).eval(), ROOT / "runs" / "export" / Path(str(cfg)).stem


def output_path(base: Path, fmt: str, int8: bool, override: Union[str, Path, None] = None) -> Path:
    """Where format `fmt` goes: best.pt -> best.onnx / best.torchscript / best_openvino_model (with _int8 when quantised)."""
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript", "openvino": "_openvino_model", "ncnn": "_ncnn_model",
              "tflite": ".tflite", "coreml": ".mlpackage"}[fmt]
    tag = "_int8" if int8 and fmt in ("onnx", "openvino") else ""
    if override is not None:
        out = Path(override)
        folder = fmt in ("openvino", "ncnn", "coreml")
        if (folder and out.name.endswith(suffix)) or (not folder and out.suffix == suffix):
            return out
        base, tag = out.parent / (out.stem if out.suffix in (".onnx", ".torchscript", ".pt", ".tflite", ".mlpackage") else out.name), ""
    return base.parent / f"{base.name}{tag}{suffix}"


def _check_options(include: list[str], half: bool, device: torch.device, int8: bool, data: Any) -> list[str]:
    """Validate the format list and flag combinations; return the formats lower-cased in order."""
    fmts = [f.lower() for f in include]
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown --include format(s) {unknown}; known formats: {', '.join(FORMATS)}")
    if half and device.type != "cuda" and not set(fmts) <= set(CPU_HALF_FORMATS):
        raise ExportError(f"--half needs a CUDA device (use --device 0), except for {' and '.join(CPU_HALF_FORMATS)} alone")
    if int8 and not data and set(fmts) - {"coreml"}:  # Core ML's int8 is weight-only: no calibration images
        raise ExportError("--int8 needs calibration images: pass --data (dataset yaml or image folder)")
    if int8 and half:
        raise ExportError("--int8 and --half are mutually exclusive")
    return list(dict.fromkeys(fmts))


def _export_onnx_family(model: Any, fmts: list[str], base: Path, opt: dict[str, Any], meta: dict[str, Any]) -> dict[str, Path]:
    """ONNX and OpenVINO share one fp32 (or int8) ONNX graph; OpenVINO converts from it."""
    from utils.export.quantize import calibration_images, quantize_onnx

    out: dict[str, Path] = {}
    images = calibration_images(opt["data"], limit=opt["n_calib"]) if opt["int8"] else []
    work = Path(tempfile.mkdtemp(prefix="export_"))
    try:
        onnx_file = export_onnx_model(model, work / "model.onnx", opt["imgsz"], opt["batch_size"], opt["dynamic"], opt["opset"],
                                      opt["simplify"], meta, nms=opt["nms"])  # fmt: skip
        if opt["int8"]:
            LOGGER.info(f"INT8 calibration on {len(images)} images")
            onnx_file = quantize_onnx(onnx_file, work / "model_int8.onnx", images, opt["imgsz"], n_calib=opt["n_calib"],
                                      per_channel=not opt["per_tensor"])
            _copy_metadata(onnx_file, meta)
        if "onnx" in fmts:
            dst = output_path(base, "onnx", opt["int8"], opt["output"])
            with atomic_path(dst) as tmp:
                shutil.copyfile(onnx_file, tmp)
            out["onnx"] = dst
        if "openvino" in fmts:
            dst = output_path(base, "openvino", opt["int8"], opt["output"])
            out["openvino"] = export_openvino_model(onnx_file, dst, meta, half=opt["half"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _copy_metadata(onnx_file: Path, meta: dict[str, Any]) -> None:
    """Re-attach the metadata props (quantisation drops them) and re-check the model."""
    import onnx

    from utils.export.formats import set_onnx_metadata

    proto = onnx.load(str(onnx_file))
    set_onnx_metadata(proto, {**meta, "int8": True})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_file))


def _export_torchscript(model: DetectionModel, base: Path, opt: dict[str, Any], meta: dict[str, Any]) -> Path:
    out = output_path(base, "torchscript", opt["int8"], opt["output"])
    return export_torchscript_model(model, out, opt["imgsz"], opt["batch_size"], meta, nms=opt["nms"])


def _export_ncnn(model: DetectionModel, base: Path, opt: dict[str, Any], meta: dict[str, Any]) -> Path:
    from utils.export.ncnn import export_ncnn

    return export_ncnn(model, output_path(base, "ncnn", False, opt["output"]), opt["imgsz"], opt["batch_size"], meta,
                       nms=opt["nms"])


def _export_tflite(model: DetectionModel, base: Path, opt: dict[str, Any], meta: dict[str, Any]) -> Path:
    """best_float32.tflite (--half: best_float16, --int8: best_int8 calibrated on --data), via ONNX and onnx2tf in subprocesses."""
    from utils.export.quantize import calibration_images, letterboxed_images
    from utils.export.tflite import export_tflite, tflite_filename

    quant = "int8" if opt["int8"] else "fp16" if opt["half"] else "fp32"
    calib = None
    if opt["int8"]:
        files = calibration_images(opt["data"], limit=opt["n_calib"])
        LOGGER.info(f"TFLite INT8 calibration on {len(files)} images")
        calib = letterboxed_images(files, opt["imgsz"])
    out = output_path(base, "tflite", False, opt["output"])
    out = out.with_name(tflite_filename(out.stem, quant)) if opt["output"] is None else out
    return export_tflite(model, out, opt["imgsz"], meta, quant=quant, calibration=calib, nms=opt["nms"])


def _export_coreml(model: DetectionModel, base: Path, opt: dict[str, Any], meta: dict[str, Any]) -> Path:
    from utils.export.coreml import export_coreml

    out = output_path(base, "coreml", opt["int8"], opt["output"])
    return export_coreml(model, out, opt["imgsz"], meta, half=opt["half"], int8=opt["int8"], nms=opt["nms"])


SINGLE_EXPORTERS = {"torchscript": _export_torchscript, "ncnn": _export_ncnn, "tflite": _export_tflite, "coreml": _export_coreml}


def _check_head(model: DetectionModel, fmts: list[str], nms: bool, int8: bool, dynamic: bool, opset: int) -> None:
    """The options the model's head can export with (its HeadPolicy): formats, --nms, --int8, --dynamic and the opset."""
    policy = model.head.policy
    what = f"{policy.title} models"
    able = policy.export_formats
    unable = [f for f in fmts if able is not None and f not in able]
    reasons = dict(policy.export_refusals)
    for fmt in (f for f in unable if f in reasons):
        raise ExportError(f"{what} cannot export to {fmt}: {reasons[fmt]}")
    if unable and able is not None:
        raise ExportError(f"{what} export to {', '.join(able)} only, not {', '.join(unable)}")
    if nms and not policy.nms_export:
        raise ExportError(f"--nms: {policy.nms_reason or f'not available for {what}'}")
    if nms and "ncnn" in fmts:
        from utils.export.ncnn import check_nms_model

        check_nms_model(model)  # before any format is written
    if nms and "coreml" in fmts:
        from utils.export.coreml import check_nms_model as check_coreml_nms_model

        check_coreml_nms_model(model)
    no_int8 = [f for f in fmts if int8 and not policy.allows_int8(f)]
    if no_int8:
        raise ExportError(f"--int8 is not available for {what} in {', '.join(no_int8)}: {policy.int8_reason}")
    if dynamic and not policy.dynamic_export:
        raise ExportError(f"--dynamic: the exported graph of {what} has its feature-map sizes built in; export one fixed --imgsz")
    if "onnx" in fmts and opset < policy.min_opset:
        raise ExportError(f"--opset {opset}: {what} need ONNX opset >= {policy.min_opset}")


def _check_format_flags(fmts: list[str], settings: NMSSettings | None, int8: bool) -> None:
    """Refuse --nms / --int8 for formats that cannot hold them, before any model is built; one line naming the format."""
    if settings is not None:
        settings.check()
        if int8:
            raise ExportError("--nms cannot be combined with --int8 yet: quantise the plain model and run NMS outside it")
    for flag, on, able in (("--nms", settings is not None, NMS_FORMATS), ("--int8", int8, INT8_FORMATS)):
        unable = [f for f in fmts if on and f not in able]
        for fmt in (f for f in unable if flag == "--nms" and f in NMS_REFUSALS):
            raise ExportError(f"--nms is not available for {fmt}: {NMS_REFUSALS[fmt]}")
        if unable:
            raise ExportError(f"{flag} is not available for {', '.join(unable)} (only {', '.join(able)})")
    if settings is not None and "ncnn" in fmts:
        from utils.export.ncnn import check_nms

        check_nms(settings)  # NCNN's NMS layer takes fewer options
    if settings is not None and "coreml" in fmts:
        from utils.export.coreml import check_nms as check_coreml_nms

        check_coreml_nms(settings)  # Core ML's NonMaximumSuppression model caps only the total
    if settings is not None and "tflite" in fmts:
        from utils.export.tflite import check_nms as check_tflite_nms

        check_tflite_nms(settings)  # one NMS over class-shifted boxes caps only the total


def export_model(
    weights: Any = None,
    cfg: Any = None,
    include: Union[list[str], tuple[str, ...]] = ("onnx",),
    imgsz: Union[int, list[int], tuple[int, ...]] = (640, 640),
    batch_size: int = 1,
    device: str = "cpu",
    half: bool = False,
    dynamic: bool = False,
    simplify: bool = False,
    opset: int = 17,
    int8: bool = False,
    data: Any = None,
    n_calib: int = 300,
    output: Any = None,
    nms: bool = False,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    topk_per_class: int = 100,
    topk_all: int = 100,
    agnostic_nms: bool = False,
    per_tensor: bool = False,
) -> list[Path]:
    """Export the model to every format in `include`; returns the written paths in that order.

    With `nms` the exported graph ends in NMS (conf_thres, iou_thres, topk_per_class, topk_all, agnostic_nms) and
    returns (B, topk_all, 6 + nm) final detections (nm mask coefficients and then the prototypes for a segmentation model).
    """
    check_int("--batch-size", batch_size)
    check_int("--n-calib", n_calib)
    settings = NMSSettings(conf_thres, iou_thres, topk_per_class, topk_all, agnostic_nms) if nms else None
    dev = select_device(device)
    fmts = _check_options(list(include), half, dev, int8, data)
    _check_format_flags(fmts, settings, int8)
    model, base = _build_model(weights, cfg, dev)
    _check_head(model, fmts, nms, int8, dynamic, opset)
    model = model.eval().fuse()
    for p in model.parameters():
        p.requires_grad_(False)
    size = check_export_imgsz(imgsz, int(max(int(model.stride.max()), 32)))
    model = model.half() if half and dev.type == "cuda" else model.float()
    with torch.no_grad():
        im = torch.zeros(batch_size, 3, *size, device=dev, dtype=next(model.parameters()).dtype)
        for _ in range(2):
            y = model(im)[0]  # dry run: builds nothing lazily but catches shape errors before tracing
    LOGGER.info(f"PyTorch: starting from {weights or cfg} with output shape {tuple(y.shape)}")
    meta = export_metadata(model, size, batch_size, dynamic, half)
    if settings is not None:
        meta["nms"] = asdict(settings)
    opt = dict(imgsz=size, batch_size=batch_size, dynamic=dynamic, opset=opset, simplify=simplify, int8=int8, data=data,
               n_calib=n_calib, output=output, half=half, nms=settings, per_tensor=per_tensor)  # fmt: skip
    written: dict[str, Path] = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if "onnx" in fmts or "openvino" in fmts:
        written.update(_export_onnx_family(model, fmts, base, opt, meta))
        timings.update(dict.fromkeys(written, time.perf_counter() - t0))
    for fmt in (f for f in fmts if f in SINGLE_EXPORTERS):
        t1 = time.perf_counter()
        written[fmt] = SINGLE_EXPORTERS[fmt](model, base, opt, meta)
        timings[fmt] = time.perf_counter() - t1
    files = [written[f] for f in fmts]
    task = task_of(model)
    _summary(files, [timings[f] for f in fmts], size, task.predict_script, task.val_script)
    return files


def _size_mb(path: Path) -> float:
    """Size of a file or of all files in a folder, in MB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _summary(files: list[Path], seconds: list[float], size: tuple[int, int], predict: str, val: str) -> None:
    """Print what was written and how to use it (with the model's task's scripts)."""
    lines = ["", "Export complete:"]
    lines += [f"  {p}  ({_size_mb(p):.1f} MB, {s:.1f}s)" for p, s in zip(files, seconds)]
    runnable = [p for p in files if p.suffix != ".mlpackage"]  # Core ML runs only on Apple systems
    if runnable:
        lines += [
            f"Predict:  {shell_command('python', predict, '--weights', runnable[0], '--imgsz', size[0], size[1])}",
            f"Validate: {shell_command('python', val, '--weights', runnable[0], '--imgsz', max(size))}",
        ]
    print("\n".join(lines))
