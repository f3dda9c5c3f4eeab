"""convert_checkpoint: a YOLOv5 / ultralytics YOLOv8 checkpoint -> this project's state_dict checkpoint, nothing executed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from models.model import DetectionModel
from models.parse import ModelConfigError
from utils.checkpoint import save_checkpoint
from utils.convert.mapping import HEAD_KINDS, ConversionError, Upstream, check_settings, load_strict, read_upstream, tensor_attr
from utils.convert.unpickler import UnsafeCheckpointError, read_torch_zip
from utils.files import first_line

LOGGER = logging.getLogger("mobile_yolo")
SUFFIX = "-converted"  # the default output: <stem>-converted.pt beside the source


def output_path(src: Path, dst: Union[str, Path, None]) -> Path:
    """`dst` (a file, or a folder: the source's name in it), else <stem>-converted.pt beside `src`; never the source or an existing file."""
    if dst is None:
        out = src.with_name(f"{src.stem}{SUFFIX}.pt")
    else:
        out = Path(dst)
        if out.is_dir() or str(dst).endswith(("/", "\\")):
            out = out / src.name
    if out.resolve() == src.resolve():
        raise ConversionError(f"{src}: the output would replace the source file; give another --out")
    if out.exists():
        raise ConversionError(f"{out}: already exists (remove it or give another --out)")
    return out


def build_model(upstream: Upstream, src: Path) -> DetectionModel:
    """Our DetectionModel from the file's yaml, with a head of the file's kind, its layer settings checked and weights loaded."""
    try:
        model = DetectionModel(upstream.cfg, ch=int(upstream.cfg["ch"]))
    except (ModelConfigError, TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise ConversionError(f"{src}: its model config cannot be built here ({first_line(e)})") from None
    want = HEAD_KINDS.get(upstream.head.upstream, "anchor_free")
    if model.head_kind != want:
        raise ConversionError(f"{src}: its config builds a {model.head_kind} head here but the file holds a {upstream.head.upstream}")
    load_strict(model, upstream.state, src)
    check_settings(upstream, model, src)
    for where in (upstream.head, upstream.model):
        stride = tensor_attr(where, "stride")
        if stride is not None and stride.tolist() != model.stride.tolist():
            raise ConversionError(f"{src}: strides {stride.tolist()} in the file but {model.stride.tolist()} here")
    model.names = list(upstream.names)
    return model.eval()


def load_upstream(src: Union[str, Path]) -> tuple[DetectionModel, Upstream]:
    """Read a YOLOv5 / ultralytics checkpoint without executing anything and rebuild it as our model (weights loaded)."""
    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src}: file not found")
    try:
        obj = read_torch_zip(src)
    except UnsafeCheckpointError as e:
        raise ConversionError(f"{src}: {e}") from None
    try:
        upstream = read_upstream(obj, src)
        return build_model(upstream, src), upstream
    except RecursionError:  # a config or module tree nested beyond reason
        raise ConversionError(f"{src}: its model config or module tree is nested too deeply to read") from None


def convert_checkpoint(src: Union[str, Path], dst: Union[str, Path, None] = None) -> Path:
    """Convert YOLOv5 / ultralytics YOLOv8 checkpoint `src` into this project's checkpoint at `dst`; returns its path."""
    src = Path(src)
    out = output_path(src, dst)
    model, upstream = load_upstream(src)
    save_checkpoint(out, model, names=upstream.names, converted_from=src.name, upstream=upstream.family)
    LOGGER.info(f"{src} ({upstream.family}, {len(upstream.state)} tensors, nc={model.yaml['nc']}) -> {out}")
    return out
