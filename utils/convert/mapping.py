"""Map the stand-in module tree of a YOLOv5 / ultralytics YOLOv8 checkpoint onto this project's DetectionModel.

The upstream models and ours share the yaml format and the module attribute names, so the flat state_dict keys agree
(model.0.conv.weight ... model.24.anchors, model.22.dfl.conv.weight); Detect.anchors are in grid units (divided by the
stride) in both. Buffers we do not keep (YOLOv5 <= v5.0's anchor_grid) are dropped; everything else must match our
model key for key and shape for shape, and the layer settings that change numbers (BatchNorm eps, conv stride/padding/
groups, activations, upsampling, pooling) are compared module by module before the weights are loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.model import DetectionModel
from utils.convert.unpickler import StandIn, TensorRef

MAX_DEPTH = 32  # module nesting (YOLOv8n: 7)
DROPPED_BUFFERS = ("anchor_grid",)  # YOLOv5 <= v5.0 registered the decoded anchor grid as a buffer; we recompute it
FAMILIES = {  # model class -> (family, head classes it may end in)
    "models.yolo.DetectionModel": ("yolov5", ("models.yolo.Detect",)),
    "models.yolo.Model": ("yolov5", ("models.yolo.Detect",)),
    "models.yolo.SegmentationModel": ("yolov5", ("models.yolo.Segment",)),
    "ultralytics.nn.tasks.DetectionModel": ("yolov8", ("ultralytics.nn.modules.head.Detect", "ultralytics.nn.modules.Detect")),
}
HEAD_KINDS = {"models.yolo.Detect": "anchor_based", "models.yolo.Segment": "segment"}  # any other head: anchor_free
# torch.nn settings that change a layer's numbers, compared between the file's modules and ours
SETTINGS = {
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    "BatchNorm2d": ("num_features", "eps"),
    "LeakyReLU": ("negative_slope",),
    "Upsample": ("scale_factor", "mode"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation"),
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the file."""


@dataclass
class Upstream:
    """What a YOLOv5 / YOLOv8 checkpoint holds, as plain data."""

    family: str  # "yolov5" or "yolov8"
    model: StandIn
    head: StandIn
    cfg: dict
    names: list[str]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def find_model(obj: Any, src: Path) -> StandIn:
    """The pickled model: the checkpoint's 'ema' (as YOLOv5 and ultralytics load it) else its 'model', or the object itself."""
    if isinstance(obj, StandIn):
        candidates = [obj]
    elif isinstance(obj, dict):
        if "format_version" in obj and "cfg" in obj:
            raise ConversionError(f"{src}: already a checkpoint of this project (use it with --weights as it is)")
        candidates = [obj[k] for k in ("ema", "model") if isinstance(obj.get(k), StandIn)]
    else:
        candidates = []
    if not candidates:
        raise ConversionError(f"{src}: not a YOLOv5/YOLOv8 checkpoint (no pickled model under 'model' or 'ema')")
    model = candidates[0]
    if model.upstream not in FAMILIES:
        raise ConversionError(f"{src}: holds a {model.upstream}, not a YOLOv5/YOLOv8 detection or segmentation model; "
                              f"convertible: {', '.join(FAMILIES)}")
    return model


def flat_state(module: StandIn, src: Path, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    """nn.Module.state_dict() of the stand-in tree: every parameter and persistent buffer under its module path."""
    if depth > MAX_DEPTH:
        raise ConversionError(f"{src}: modules nested deeper than {MAX_DEPTH} levels at {prefix or 'the root'}")
    out: dict[str, torch.Tensor] = {}
    skip = module.state.get("_non_persistent_buffers_set") or set()
    for table in ("_parameters", "_buffers"):
        for name, value in _mapping(module, table, src).items():
            if value is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(value, TensorRef):
                raise ConversionError(f"{src}: {prefix}{name} of {module.upstream} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.tensor
    for name, child in _mapping(module, "_modules", src).items():
        if child is None:
            continue
        if not isinstance(child, StandIn):
            raise ConversionError(f"{src}: {prefix}{name} of {module.upstream} is a {type(child).__name__}, not a module")
        out.update(flat_state(child, src, f"{prefix}{name}.", depth + 1))
    return out


def _mapping(module: StandIn, key: str, src: Path) -> dict[str, Any]:
    """One of a module's name -> value tables (_parameters, _buffers, _modules); absent is empty."""
    table = module.state.get(key, {})
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise ConversionError(f"{src}: {module.upstream}.{key} is not a mapping of names")
    return table


def submodules(module: StandIn, prefix: str = "", depth: int = 0) -> list[tuple[str, StandIn]]:
    """(path, stand-in) of every module of the tree, the root as '' (flat_state has checked the tree)."""
    found = [(prefix.rstrip("."), module)]
    if depth <= MAX_DEPTH:
        for name, child in module.state.get("_modules", {}).items():
            if isinstance(child, StandIn):
                found += submodules(child, f"{prefix}{name}.", depth + 1)
    return found


def read_upstream(obj: Any, src: Path) -> Upstream:
    """The model, config, class names and flat state of an unpickled YOLOv5 / ultralytics checkpoint."""
    model = find_model(obj, src)
    family, heads = FAMILIES[model.upstream]
    state = flat_state(model, src)
    layers = model.state.get("_modules", {}).get("model")
    children = list(layers.state.get("_modules", {}).values()) if isinstance(layers, StandIn) else []
    head = children[-1] if children else None
    if not isinstance(head, StandIn) or head.upstream not in heads:
        got = head.upstream if isinstance(head, StandIn) else "nothing"
        raise ConversionError(f"{src}: a {model.upstream} must end in {' or '.join(heads)}, this one ends in {got}")
    cfg = model_config(model, head, family, state, src)
    return Upstream(family, model, head, cfg, class_names(model.state.get("names"), int(cfg["nc"]), src), state)


def model_config(model: StandIn, head: StandIn, family: str, state: dict[str, torch.Tensor], src: Path) -> dict:
    """The model yaml the file pickles (its `yaml` attribute), with nc, channels and anchors taken from the weights."""
    cfg = model.state.get("yaml")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("nc", "backbone", "head")):
        raise ConversionError(f"{src}: the model's yaml config is missing or lacks nc/backbone/head")
    cfg = copy.deepcopy(cfg)
    nc = head.state.get("nc", cfg["nc"])
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ConversionError(f"{src}: the head's class count nc={nc!r} is not a positive integer")
    cfg["nc"] = nc
    ch = cfg.pop("channels", cfg.get("ch", 3))  # ultralytics names the input channels `channels`, YOLOv5 `ch`
    cfg["ch"] = ch
    stride = tensor_attr(head, "stride")
    anchors = next((v for k, v in state.items() if k.endswith("anchors") and k.count(".") == 2), None)
    if family == "yolov5" and anchors is not None and stride is not None and anchors.ndim == 3 and len(stride) == len(anchors):
        # the weights' anchors (AutoAnchor rewrites them after the yaml was written), back in pixels as a yaml holds them
        cfg["anchors"] = [[round(float(v), 4) for v in (a * s).flatten()] for a, s in zip(anchors, stride.float())]
    return cfg


def tensor_attr(module: StandIn, name: str) -> torch.Tensor | None:
    """The tensor a stand-in's plain attribute holds (YOLOv5's and ultralytics' `stride`), if it holds one."""
    value = module.state.get(name)
    return value.tensor if isinstance(value, TensorRef) else None


def class_names(names: Any, nc: int, src: Path) -> list[str]:
    """The class names as a list of nc strings (YOLOv5 stores a list, newer YOLOv5 and ultralytics a {index: name} dict)."""
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ConversionError(f"{src}: class names must be keyed 0..{len(names) - 1}, got keys {sorted(names, key=str)[:5]}...")
        names = [names[i] for i in range(len(names))]
    if names is None:
        return [str(i) for i in range(nc)]
    if not isinstance(names, (list, tuple)) or len(names) != nc:
        size = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise ConversionError(f"{src}: {size} class names for a head with nc={nc}")
    return [str(n) for n in names]


def check_settings(upstream: Upstream, ours: nn.Module, src: Path) -> None:
    """Each torch.nn layer of the file has the settings (eps, stride, padding, activation, ...) of our layer at its path."""
    own = dict(ours.named_modules())
    for path, module in submodules(upstream.model):
        cls = module.upstream.rsplit(".", 1)[1]
        if not module.upstream.startswith("torch.nn."):
            continue
        mine = own.get(path)
        if mine is None or type(mine).__name__ != cls:
            got = type(mine).__name__ if mine is not None else "nothing"
            raise ConversionError(f"{src}: {path} is a {cls} in the file but a {got} in the model its config builds here")
        for attr in SETTINGS.get(cls, ()):
            theirs, mine_v = _plain(module.state.get(attr)), _plain(getattr(mine, attr, None))
            if theirs != mine_v:
                raise ConversionError(f"{src}: {path} ({cls}) has {attr}={theirs!r} in the file but {mine_v!r} here")


def _plain(value: Any) -> Any:
    """A layer setting in comparable form: a pair of equal values (kernel (3, 3)) as the one value, lists as tuples."""
    if isinstance(value, (list, tuple)):
        vals = tuple(_plain(v) for v in value)
        return vals[0] if vals and all(v == vals[0] for v in vals) else vals
    return value


def load_strict(model: DetectionModel, state: dict[str, torch.Tensor], src: Path) -> None:
    """Load the mapped weights into `model`, every key and shape matching; the first difference is one line."""
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DROPPED_BUFFERS}
    own = model.state_dict()
    for key in own:
        if key not in state:
            raise ConversionError(f"{src}: the file has no {key} (first missing key of {len(own)}; the file holds {len(state)})")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise ConversionError(f"{src}: {key} is {tuple(state[key].shape)} in the file but {tuple(own[key].shape)} here")
    extra = [k for k in state if k not in own]
    if extra:
        raise ConversionError(f"{src}: the file holds {extra[0]} that the model has no place for ({len(extra)} such keys)")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
