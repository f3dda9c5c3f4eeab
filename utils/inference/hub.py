"""What hubconf.py's torch.hub entries build: a model from any weights file, or a shipped config with optional local weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Union

from torch import nn

from models.flops import count_gflops
from models.model import DetectionModel
from models.parse import ModelConfigError
from utils.checkpoint import load_state, read_checkpoint
from utils.device import select_device
from utils.inference.autoshape import AutoShape
from utils.paths import ROOT
from utils.runtime.backend import DetectBackend
from utils.tasks import task_of

LOGGER = logging.getLogger("mobile_yolo")

CONFIG_DIR = ROOT / "models"
DeviceSpec = Union[str, int, None]
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a config's file stem: no path separators, no leading dot


def shipped_configs() -> list[str]:
    """Names of the model configs in models/ (yolov5s, yolov5_mobilenetv4, ...), one torch.hub entry each."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """models/<name>.yaml for a model name (letters, digits, '_', '-', '.'; no path, no '..'); ValueError for anything
    else, so a name never reaches a yaml outside models/ (weights files are passed separately, as `path`)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"model name {name!r}: must be the name of a config in models/ (letters, digits, '_', '-', '.'; "
                         "no folders, no '..'); see python hubconf.py --list; weights files go in path= (--path)")
    cfg = CONFIG_DIR / f"{name}.yaml"
    if not cfg.is_file() or cfg.resolve().parent != CONFIG_DIR.resolve():
        raise ValueError(f"{name}: no such model config; known: {', '.join(shipped_configs())}")
    return cfg


def _report(text: str, verbose: bool) -> None:
    if verbose:
        print(text)


def load_custom(path: Union[str, Path], autoshape: bool = True, device: DeviceSpec = None, verbose: bool = True) -> nn.Module:
    """Any trained or exported model (.pt, .torchscript, .onnx, OpenVINO); AutoShape-wrapped unless autoshape=False.

    Without AutoShape a .pt gives its DetectionModel (trainable, unfused) and an exported file its DetectBackend; so does
    so does, with a warning, a model AutoShape does not serve (segmentation, classification), as YOLOv5's hub does.
    """
    dev = select_device("" if device is None else device)
    path = Path(path)
    backend = DetectBackend(path, device=dev)
    autoshape = autoshape and _autoshape_serves(backend, path)
    if not autoshape and path.suffix == ".pt":
        from utils.checkpoint import load_model

        model: nn.Module = load_model(path, device=dev)
    else:
        model = AutoShape(backend) if autoshape else backend
    names = getattr(model, "names", [])
    _report(f"Loaded {path} on {dev}: {len(names)} classes ({', '.join(map(str, names[:5]))}{', ...' * (len(names) > 5)})", verbose)
    return model


def _autoshape_serves(backend: DetectBackend, where: Union[str, Path]) -> bool:
    """Whether AutoShape can wrap the model; if not, YOLOv5's warning (the model takes (B, 3, H, W) 0-1 tensors)."""
    if AutoShape.serves(backend):
        return True
    own = task_of(backend)
    LOGGER.warning(f"WARNING: {where}: a {own.what} is not AutoShape compatible; returning the model itself, which takes "
                   f"(B, 3, H, W) float 0-1 tensors (or run it with {own.predict_script})")
    return False


def load_config(
    name: str, pretrained: bool = True, channels: int = 3, classes: int | None = None, autoshape: bool = True,
    device: DeviceSpec = None, path: Union[str, Path, None] = None, verbose: bool = True,
) -> nn.Module:
    """Build models/<name>.yaml, with the trained weights of a local checkpoint `path`; no detector weights are bundled."""
    cfg = config_path(name)
    if path is None and pretrained:
        raise ValueError(f"{name}: no pretrained detector weights are bundled with this repository; pass path='best.pt' "
                         f"(a checkpoint trained from {name}.yaml) or pretrained=False for an untrained model")
    ckpt = read_checkpoint(path) if path is not None else None
    nc = classes if classes is not None else int(ckpt["cfg"].get("nc", 80)) if ckpt else 80
    try:
        model = DetectionModel(cfg, ch=channels, nc=nc)
    except ModelConfigError as e:
        raise ValueError(f"{name}: {e}") from None
    if ckpt is not None:
        load_state(model, ckpt.get("ema") or ckpt["model"], path or "", what=f"weights (for {name}.yaml, {nc} classes)")
        model.names = list(ckpt.get("names") or model.names)
    dev = select_device("" if device is None else device)
    _report(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {nc} classes, "
            f"weights {path if path is not None else 'none (untrained)'}, on {dev}", verbose)
    if autoshape and _autoshape_serves(DetectBackend(model, device=dev), cfg.name):
        return AutoShape(DetectBackend(model, device=dev))
    return model.to(dev)


def describe_model(model: nn.Module, imgsz: int = 640) -> str:
    """A short summary of what a hub entry returned: parameters, GFLOPs, strides, head and classes."""
    core: Any = model.model if isinstance(model, AutoShape) else model
    if isinstance(core, DetectBackend) and core.pt:
        core = core.model
    if isinstance(core, DetectionModel):
        name = Path(core.yaml.get("yaml_file", "model")).stem
        lines = [f"{name}: {sum(p.numel() for p in core.parameters()):,} parameters, "
                 f"{count_gflops(core, imgsz):.1f} GFLOPs at {imgsz}x{imgsz}",
                 f"strides: {', '.join(f'{s:g}' for s in core.stride.tolist())}", f"head: {core.head_kind}"]
        names = list(core.names)
    else:
        lines = [f"{core.weights} ({core.format}): stride {core.stride}, "
                 f"input {'x'.join(map(str, core.input_shape)) if core.input_shape else 'dynamic'}", f"head: {core.head_kind}"]
        names = list(core.names)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    lines.append(f"classes: {len(names)} ({shown})")
    return "\n".join(lines)
