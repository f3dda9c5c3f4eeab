"""Writers for the deployable formats (ONNX, TorchScript, OpenVINO) of a fused DetectionModel, each written atomically."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Union, cast

import torch
import yaml
from torch import nn

from utils.cli import check_img_size
from utils.export.end2end import End2End, NMSSettings
from utils.files import remove_stale_temps
from utils.runtime import packages
from utils.runtime.openvino import OPENVINO_METADATA

LOGGER = logging.getLogger("mobile_yolo")
INPUT_NAME, OUTPUT_NAME = "images", "output0"  # further outputs (a head's output_axes) follow as output1, ...
TORCHSCRIPT_CONFIG = "config.txt"
EXPORT_DESCRIPTION = "mobile_yolo detector"


class ExportError(ValueError):
    """An export that cannot be done (bad option, missing optional package, failed check); one-line message."""


class ExportModel(nn.Module):
    """Inference view of a DetectionModel that returns only the head's decoded output (its export layout), and for a
    segmentation model also the mask prototypes (YOLOv5-seg's two outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head: Any = type(cast(Any, model).head)  # a DetectionModel's head class
        self.eval()  # exporters restore the wrapper's mode afterwards; it must be eval, not the nn.Module default

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.head.inference_outputs(self.model(x))


def export_wrapper(model: nn.Module, nms: NMSSettings | None = None) -> nn.Module:
    """What gets traced: the head's decoded output, or with `nms` the final (B, topk_all, 6 + nm) detections (and a
    segmentation model's prototypes after them)."""
    return End2End(model, nms) if nms is not None else ExportModel(model)


def check_export_imgsz(imgsz: Union[int, list[int], tuple[int, ...]], stride: int) -> tuple[int, int]:
    """(h, w) from one or two ints, each rounded up to a multiple of the model stride (with a warning)."""
    size = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if len(size) not in (1, 2):
        raise ExportError(f"--imgsz expects one or two positive ints (h w), got {size}")
    h, w = check_img_size(size * 2 if len(size) == 1 else size, stride)
    return h, w


def export_metadata(model: nn.Module, imgsz: tuple[int, int], batch_size: int, dynamic: bool, half: bool) -> dict[str, Any]:
    """The facts an inference backend needs about an exported model: stride, class names, input shape."""
    stride_t = getattr(model, "stride", None)
    stride = int(max(int(stride_t.max()), 32)) if isinstance(stride_t, torch.Tensor) else 32
    names = [str(n) for n in getattr(model, "names", [])]
    cfg = getattr(model, "yaml", {}) or {}
    return {
        "description": EXPORT_DESCRIPTION,
        "model": Path(str(cfg.get("yaml_file", "model"))).stem,
        "stride": stride,
        "names": names,
        "imgsz": [int(imgsz[0]), int(imgsz[1])],
        "batch": int(batch_size),
        "dynamic": bool(dynamic),
        "half": bool(half),
        "head": str(model.head_kind),
        "task": str(model.head.policy.task),  # type: ignore[union-attr]  # a DetectionModel's head
    }


def is_export_folder(path: Path) -> bool:
    """True for a folder this project exported (its metadata.yaml names us and it holds only model files)."""
    try:
        meta = yaml.safe_load((path / OPENVINO_METADATA).read_text(encoding="utf-8"))
        entries = list(path.iterdir())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    ours = isinstance(meta, dict) and meta.get("description") == EXPORT_DESCRIPTION
    return ours and all(p.is_file() and not p.is_symlink() and p.suffix in (".xml", ".bin", ".yaml", ".param") for p in entries)


@contextlib.contextmanager
def atomic_path(final: Path, is_ours: Callable[[Path], bool] = is_export_folder) -> Iterator[Path]:
    """Yield a temp path beside `final` (file or folder); move it into place on success, delete it on error.

    An existing file is replaced, as YOLOv5 re-exports do; an existing folder only when `is_ours` recognises it as one
    of our own exports, so an --output that names a user's directory never deletes it.
    """
    final = Path(final)
    if final.is_dir() and not is_ours(final):
        raise ExportError(f"{final}: is an existing folder that export.py did not create; refusing to replace it (choose another --output)")
    remove_stale_temps(final.parent, glob.escape(final.name))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as e:
        raise ExportError(f"{final.parent}: cannot write the export there ({e.strerror or e})") from None
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise ExportError(f"{final}: exporter wrote no output")
        if final.exists() and final.is_dir() != tmp.is_dir():
            kind = "folder" if final.is_dir() else "file"
            raise ExportError(f"{final}: an existing {kind} is in the way of this export; refusing to replace it (choose another --output)")
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _dummy_input(model: nn.Module, imgsz: tuple[int, int], batch_size: int) -> torch.Tensor:
    """A zero image batch on the model's device and dtype."""
    p = next(model.parameters())
    return torch.zeros(batch_size, 3, *imgsz, device=p.device, dtype=p.dtype)


def export_onnx_model(
    model: nn.Module,
    out: Union[str, Path],
    imgsz: tuple[int, int],
    batch_size: int = 1,
    dynamic: bool = False,
    opset: int = 17,
    simplify: bool = False,
    metadata: dict[str, Any] | None = None,
    nms: NMSSettings | None = None,
) -> Path:
    """Trace an eval (fused) DetectionModel to ONNX (input 'images', output 'output0'), add metadata, check it.

    With `nms` the graph ends in NonMaxSuppression and top-k: output0 is (B, topk_all, 6 + nm) final detections (nm mask
    coefficients for a segmentation model, whose prototypes stay output1).
    """
    import onnx

    wrapper = export_wrapper(model, nms)
    im = _dummy_input(model, imgsz, batch_size)
    per_output = list(model.head.output_axes())  # type: ignore[union-attr, operator]
    if nms:
        per_output[0] = {0: "batch"}  # final rows: topk_all per image whatever the input size
    outputs = [f"output{i}" for i in range(len(per_output))]  # output0 (= OUTPUT_NAME), output1 (prototypes) ...
    axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **dict(zip(outputs, per_output))}
    meta = metadata or export_metadata(model, imgsz, batch_size, dynamic, im.dtype == torch.float16)
    out = Path(out)
    with atomic_path(out) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
            torch.onnx.export(
                wrapper, (im,), str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=axes,
            )  # fmt: skip
        proto = onnx.load(str(tmp))
        if simplify:
            proto = simplify_onnx(proto)
        set_onnx_metadata(proto, meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Store metadata as ONNX metadata_props (strings; lists/dicts as JSON)."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)


def simplify_onnx(proto: Any) -> Any:
    """Simplify with onnxslim (preferred) or onnxsim; if neither is installed, warn with an install hint."""
    try:
        import onnxslim

        return onnxslim.slim(proto)
    except ImportError:
        pass
    try:
        import onnxsim
    except ImportError:
        LOGGER.warning("WARNING: --simplify needs onnxslim or onnxsim (pip install onnxslim); exporting without simplification")
        return proto
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        LOGGER.warning("WARNING: onnxsim could not validate the simplified model; keeping the original")
        return proto
    return simplified


def export_torchscript_model(
    model: nn.Module, out: Union[str, Path], imgsz: tuple[int, int], batch_size: int = 1, metadata: dict[str, Any] | None = None,
    nms: NMSSettings | None = None,
) -> Path:
    """Trace to TorchScript with the metadata JSON in the archive's extra file config.txt (NMS inside with `nms`)."""
    wrapper = export_wrapper(model, nms)
    im = _dummy_input(model, imgsz, batch_size)
    meta = metadata or export_metadata(model, imgsz, batch_size, False, im.dtype == torch.float16)
    out = Path(out)
    with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        ts = torch.jit.trace(wrapper, im, strict=False, check_trace=False)
        ts.save(str(tmp), _extra_files={TORCHSCRIPT_CONFIG: json.dumps(meta)})
    return out


def import_optional(module: str, purpose: str, pip: str, error: type[Exception] = ExportError) -> Any:
    """An optional converter package, or one `error` line naming the pip command that installs it."""
    return packages.import_optional(module, purpose, pip, error)


def import_openvino() -> Any:
    """The openvino package, or a one-line ExportError with the install hint."""
    return import_optional("openvino", "OpenVINO export", "pip install openvino")


def export_openvino_model(onnx_path: Union[str, Path], out_dir: Union[str, Path], metadata: dict[str, Any], half: bool = False) -> Path:
    """Convert an ONNX file to an OpenVINO IR folder (<name>.xml/.bin) with a metadata.yaml sidecar."""
    ov = import_openvino()
    out_dir = Path(out_dir)
    stem = out_dir.name.removesuffix("_openvino_model") or "model"
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        ov_model = ov.convert_model(str(onnx_path))
        ov.save_model(ov_model, str(tmp / f"{stem}.xml"), compress_to_fp16=half)
        (tmp / OPENVINO_METADATA).write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
    return out_dir
