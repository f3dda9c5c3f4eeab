"""parse_model: turn a YOLOv5/YOLOv8-style model yaml dict into layers, routes, channels and strides via the registry."""

from __future__ import annotations

import ast
import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models import limits
from models.backbone import Backbone, FeatureSelect
from models.limits import ModelLimits
from models.registry import ModuleSpec, get_module

LOGGER = logging.getLogger("mobile_yolo")
REQUIRED_KEYS = ("nc", "backbone", "head")  # `anchors` only for anchor-based heads: without it a Detect row is anchor-free
SCALE_IN_NAME = re.compile(r"(?:^|[^a-z])yolov?\d+([a-z])(?![a-z])")  # yolov8n.yaml, exp_yolov8s_mobileone_s0.yaml -> n, s
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "GELU": nn.GELU,
    "Mish": nn.Mish,
    "Identity": nn.Identity,
}


class ModelConfigError(ValueError):
    """A model yaml that cannot be built; the message is one line naming the layer and the problem."""


@dataclass
class LayerRow:
    """What info() prints for one layer."""

    index: int
    source: int | list[int]
    repeats: int
    module: str
    args: list[Any]
    params: int = 0


@dataclass
class ParsedModel:
    """Result of parse_model: layers with their routing, channels and strides per layer index."""

    layers: nn.Sequential
    routes: list[int | list[int]]  # absolute source indices; -1 = the previous layer's output
    save: list[int]
    channels: list[int | None]  # None for a backbone's own index (its output is a list)
    strides: list[float | None]
    rows: list[LayerRow] = field(default_factory=list)
    scale: str | None = None  # the `scales` entry used, if the config has scales
    backbone_end: int = 0  # layers built from the `backbone:` rows (a spliced backbone's feature indices included)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round `x` up to a multiple of `divisor` (YOLOv5 channel rounding)."""
    return int(math.ceil(x / divisor) * divisor)


def parse_activation(text: str) -> Callable[[], nn.Module]:
    """Parse an `activation:` string such as 'nn.LeakyReLU(0.1)' into a factory, without eval."""
    match = re.fullmatch(r"\s*(?:nn\.)?(\w+)\s*(?:\((.*)\))?\s*", str(text))
    if not match or match.group(1) not in ACTIVATIONS:
        raise ModelConfigError(f"activation {text!r}: unknown; known: {', '.join('nn.' + k + '()' for k in ACTIVATIONS)}")
    args: list[Any] = []
    if match.group(2) and match.group(2).strip():
        try:
            parsed = ast.literal_eval(f"({match.group(2)},)")
        except (ValueError, SyntaxError) as e:
            raise ModelConfigError(f"activation {text!r}: arguments must be literals ({e})") from None
        args = list(parsed)
    return functools.partial(ACTIVATIONS[match.group(1)], *args)


def _positive_multiple(cfg: dict, key: str) -> float:
    """Read `depth_multiple` / `width_multiple` (default 1.0); anything but a finite number > 0 is a ModelConfigError."""
    value = cfg.get(key, 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ModelConfigError(f"model config: {key} must be a positive number, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pick_scale(cfg: dict) -> str:
    """The scale letter: the `scale` key, else the letter after yolov<N> in the file name, else the first listed."""
    scales = cfg["scales"]
    if not isinstance(scales, dict) or not scales:
        raise ModelConfigError(f"model config: scales must map letters to [depth, width, max_channels], got {scales!r}")
    if cfg.get("scale") is not None:
        scale, origin = cfg["scale"], "scale key"
    else:
        match = SCALE_IN_NAME.search(Path(str(cfg.get("yaml_file", ""))).stem.lower())
        if match is None:
            first = next(iter(scales))
            if len(scales) == 1:  # nothing to choose (RT-DETR tutorial files list only l)
                return str(first)
            LOGGER.warning(f"model config: no scale given (scale key or yolov8<letter> file name); using the first, {first!r}")
            return str(first)
        scale, origin = match.group(1), f"file name {cfg['yaml_file']}"
    if scale not in scales:
        raise ModelConfigError(f"model config: scale {scale!r} (from the {origin}) is not in scales; known: {', '.join(map(str, scales))}")
    return str(scale)


def _scale_values(cfg: dict, scale: str) -> tuple[float, float, int]:
    """Validate `scales[scale]` as three positive numbers [depth, width, max_channels]."""
    entry = cfg["scales"][scale]
    if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(_is_number(v) and v > 0 for v in entry):
        raise ModelConfigError(f"model config: scales[{scale!r}] must be 3 positive numbers [depth, width, max_channels], not {entry!r}")
    return float(entry[0]), float(entry[1]), int(entry[2])


class _Builder:
    """Stateful walk over the yaml rows; one small method per module kind."""

    def __init__(self, cfg: dict, ch: int) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ModelConfigError(f"model config is missing key(s): {', '.join(missing)}")
        self.nc = _check_nc(cfg["nc"])
        self.anchors = cfg.get("anchors")
        self.out = ParsedModel(nn.Sequential(), [], [], [], [])
        self.max_ch: int | None = None
        if cfg.get("scales") is not None:
            if "depth_multiple" in cfg or "width_multiple" in cfg:
                raise ModelConfigError("model config: give either scales or depth_multiple/width_multiple, not both")
            self.out.scale = _pick_scale(cfg)
            self.gd, self.gw, self.max_ch = _scale_values(cfg, self.out.scale)
        else:
            self.gd = _positive_multiple(cfg, "depth_multiple")
            self.gw = _positive_multiple(cfg, "width_multiple")
        self.act = parse_activation(cfg["activation"]) if cfg.get("activation") else None
        self.no: int | None = None  # YOLOv5 leaves a conv whose width equals the anchor-based output width unscaled
        if self.anchors is not None:
            na = len(self.anchors[0]) // 2 if isinstance(self.anchors, (list, tuple)) else int(self.anchors)
            self.no = na * (self.nc + 5)
        self.input_ch = ch

    def run(self, rows: list) -> ParsedModel:
        for row in rows:
            self._add_row(row)
        return self.out

    def _add_row(self, row: Any) -> None:
        i = len(self.out.layers)
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ModelConfigError(f"layer {i}: expected [from, number, module, args], got {row!r}")
        f, n, name, args = row
        try:
            spec = row_spec(name, self.anchors is not None)
        except ValueError as e:
            raise ModelConfigError(f"layer {i}: {e}") from None
        n = self._repeats(i, name, n)
        sources = self._resolve_sources(i, f)
        args = [self._substitute(i, name, a) for a in (args or [])]
        try:
            module, c2, stride, args = self._build(i, spec, sources, n, args)
        except ModelConfigError:
            raise
        except (TypeError, ValueError, IndexError, ArithmeticError) as e:
            raise ModelConfigError(f"layer {i} ({name}): bad arguments {args!r}: {e}") from None
        self._append(i, f, sources, n, spec.name, args, module, c2, stride)
        if isinstance(module, Backbone):  # its feature maps fill the next indices
            for k, (c, s) in enumerate(zip(module.out_channels, module.strides)):
                self._append(i + 1 + k, i, [i], 1, "FeatureSelect", [k], FeatureSelect(k), c, s)

    def _repeats(self, i: int, name: str, n: Any) -> int:
        """Validate a row's `number` (an int, or a float, >= 1; no bools) and apply depth_multiple when > 1."""
        valid = isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 1
        if not valid:
            raise ModelConfigError(f"layer {i} ({name}): number must be a positive integer, got {n!r}")
        repeats = max(round(n * self.gd), 1) if n > 1 else int(n)
        if repeats > limits.MAX_REPEATS:
            raise ModelConfigError(f"layer {i} ({name}): number {n!r} x depth {self.gd:g} = {repeats:,}; the limit is {limits.MAX_REPEATS}")
        return repeats

    def _append(self, i: int, f: Any, sources: list[int], n: int, name: str, args: list, module: nn.Module, c2: Any, stride: Any) -> None:
        out = self.out
        out.layers.add_module(str(i), module)
        items = f if isinstance(f, (list, tuple)) else [f]
        route = [-1 if x == -1 else j for x, j in zip(items, sources)]
        out.routes.append(route if isinstance(f, (list, tuple)) else route[0])
        out.save.extend(j for x, j in zip(items, sources) if x != -1 and j not in out.save)
        if stride is not None and not stride <= limits.MAX_STRIDE:
            raise ModelConfigError(f"layer {i} ({name}): total stride {stride:g} exceeds the limit of {limits.MAX_STRIDE}")
        out.channels.append(c2)
        out.strides.append(stride)
        params = sum(p.numel() for p in module.parameters())
        out.rows.append(LayerRow(i, f, n, name, args, params))

    def _resolve_sources(self, i: int, f: Any) -> list[int]:
        items = f if isinstance(f, (list, tuple)) else [f]
        sources = []
        for x in items:
            if not isinstance(x, int) or isinstance(x, bool):
                raise ModelConfigError(f"layer {i}: 'from' must be an int or list of ints, got {f!r}")
            j = x if x >= 0 else i + x
            if (j == -1 and i != 0) or j < -1 or j >= i:
                raise ModelConfigError(f"layer {i}: 'from' index {x} is out of range (layers 0..{i - 1} exist)")
            if j >= 0 and self.out.channels[j] is None:
                raise ModelConfigError(f"layer {i}: 'from' index {x} is a backbone's feature list; use its feature indices {j + 1}..")
            sources.append(j)
        return sources

    def _substitute(self, i: int, name: Any, a: Any) -> Any:
        if a == "nc":
            return self.nc
        if a == "anchors":
            if self.anchors is None:
                raise ModelConfigError(f"layer {i} ({name}): argument 'anchors' but the config has no anchors key")
            return self.anchors
        if a == "None":
            return None
        return a

    def _src(self, j: int) -> tuple[int, float]:
        if j == -1:
            return self.input_ch, 1.0
        return self.out.channels[j], self.out.strides[j]  # type: ignore[return-value]

    def _build(self, i: int, spec: ModuleSpec, sources: list[int], n: int, args: list) -> tuple[nn.Module, Any, Any, list]:
        if spec.kind in ("concat", "detect", "segment", "head"):
            return getattr(self, f"_build_{spec.kind}")(i, spec, sources, args)
        if len(sources) != 1:
            raise ModelConfigError(f"layer {i} ({spec.name}): takes one input, got 'from' {sources}")
        c1, stride = self._src(sources[0])
        return getattr(self, f"_build_{spec.kind}")(i, spec, c1, stride, n, args)

    def _repeat(self, spec: ModuleSpec, n: int, args: list) -> nn.Module:
        kwargs = {"act": self.act} if (self.act is not None and spec.takes_act) else {}
        if n > 1:
            return nn.Sequential(*(spec.cls(*args, **kwargs) for _ in range(n)))
        return spec.cls(*args, **kwargs)

    def _build_conv(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        if not args:
            raise ModelConfigError(f"layer {i} ({spec.name}): needs at least the output channels as argument")
        c2 = args[0]
        if c2 != self.no:
            c2 = make_divisible((c2 if self.max_ch is None else min(c2, self.max_ch)) * self.gw, 8)
        if not 1 <= c2 <= limits.MAX_CHANNELS:
            msg = f"{c2:,} output channels (width {self.gw:g}); allowed 1 to {limits.MAX_CHANNELS:,}"
            raise ModelConfigError(f"layer {i} ({spec.name}): {msg}")
        args = [c1, c2, *args[1:]]
        if spec.kind == "csp":
            args.insert(2, n)
            n = 1
        s = args[spec.stride_arg] if spec.stride_arg is not None and len(args) > spec.stride_arg else 1
        return self._repeat(spec, n, args), c2, stride * s**n * spec.stride_mult, args

    _build_csp = _build_conv

    def _build_upsample(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        scale = args[1] if len(args) > 1 else None
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0 or (len(args) > 0 and args[0] is not None):
            raise ModelConfigError(f"layer {i} (nn.Upsample): needs [None, scale_factor, mode], got {args!r}")
        return self._repeat(spec, n, args), c1, stride / scale**n, args

    def _build_pool(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        s = args[1] if len(args) > 1 and args[1] is not None else (args[0] if args else 1)
        return self._repeat(spec, n, args), c1, stride * s**n, args

    def _build_pad(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        return self._repeat(spec, n, args), c1, stride, args

    _build_shape = _build_pad

    def _build_norm(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        return self._repeat(spec, n, [c1]), c1, stride, [c1]

    def _build_keep(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        """A block that keeps channels and stride, built as cls(c1, *args) (RT-DETR's AIFI [hidden, heads])."""
        return self._repeat(spec, n, [c1, *args]), c1, stride, [c1, *args]

    def _build_backbone(self, i: int, spec: ModuleSpec, c1: int, stride: float, n: int, args: list) -> tuple:
        if n != 1:
            raise ModelConfigError(f"layer {i} ({spec.name}): a backbone cannot be repeated (number={n})")
        module = spec.cls(*args, in_channels=c1)
        if not isinstance(module, Backbone) or len(module.out_channels) != len(module.strides):
            raise ModelConfigError(f"layer {i} ({spec.name}): not a Backbone declaring out_channels and strides")
        return module, None, None, args

    def _build_concat(self, i: int, spec: ModuleSpec, sources: list[int], args: list) -> tuple:
        chans, strides = zip(*(self._src(j) for j in sources))
        if len(set(strides)) > 1:
            detail = ", ".join(f"layer {j} stride {s:g}" for j, s in zip(sources, strides))
            raise ModelConfigError(f"layer {i} (Concat): inputs have different strides ({detail})")
        return spec.cls(*args), sum(chans), strides[0], args

    def _build_detect(self, i: int, spec: ModuleSpec, sources: list[int], args: list) -> tuple:
        nc, anchors, chans, strides = self._anchor_head_inputs(i, spec, sources, args)
        module = spec.cls(nc, anchors, chans, strides)
        return module, None, None, [nc, anchors, chans]

    def _build_segment(self, i: int, spec: ModuleSpec, sources: list[int], args: list) -> tuple:
        """YOLOv5's Segment: yaml arguments [nc, anchors, nm=32, npr=256]; npr (Proto's width) scales with width_multiple."""
        nc, anchors, chans, strides = self._anchor_head_inputs(i, spec, sources, args)
        nm = args[2] if len(args) > 2 else 32
        npr = args[3] if len(args) > 3 else 256
        if len(args) > 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (nm, npr)):
            raise ModelConfigError(f"layer {i} ({spec.name}): takes [nc, anchors, nm, npr] with nm and npr positive integers, got {args!r}")
        npr = make_divisible(npr * self.gw, 8)
        module = spec.cls(nc, anchors, nm, npr, chans, strides)
        return module, None, None, [nc, anchors, nm, npr, chans]

    def _anchor_head_inputs(self, i: int, spec: ModuleSpec, sources: list[int], args: list) -> tuple[Any, Any, list, list]:
        """Shared checks of an anchor-based head row: (nc, anchors per level, input channels, input strides)."""
        chans, strides = zip(*(self._src(j) for j in sources))
        nc = args[0] if args else self.nc
        anchors = args[1] if len(args) > 1 else self.anchors
        if anchors is None:
            raise ModelConfigError(f"layer {i} ({spec.name}): an anchor-based head needs anchors (an anchors key or a second argument)")
        if isinstance(anchors, int):
            raise ModelConfigError(f"layer {i} ({spec.name}): anchors must be listed per level (got the number {anchors})")
        if len(anchors) != len(sources):
            raise ModelConfigError(f"layer {i} ({spec.name}): {len(anchors)} anchor levels for {len(sources)} inputs")
        _check_head_strides(i, spec.name, sources, strides)
        return nc, anchors, list(chans), list(strides)

    def _build_head(self, i: int, spec: ModuleSpec, sources: list[int], args: list) -> tuple:
        """A head built as cls(nc, ch, strides, *rest) from yaml arguments [nc, *rest] (the head's `yaml_args`, positive
        integers, or >= 0 for those it names in `yaml_zero_ok`) or nothing (the config's nc); a head registered with
        takes_act gets the config's `activation` too."""
        chans, strides = zip(*(self._src(j) for j in sources))
        names = getattr(spec.cls, "yaml_args", ("nc",))
        zero_ok = getattr(spec.cls, "yaml_zero_ok", ())
        lowest = [0 if k > 0 and name in zero_ok else 1 for k, name in enumerate(names)]
        values = list(args) if args else [self.nc]
        if len(values) > len(names) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v, lo in zip(values, lowest)):
            kinds = f"integers (nc >= 1, {' >= 0, '.join(zero_ok)} >= 0)" if zero_ok else "positive integers"
            raise ModelConfigError(f"layer {i} ({spec.name}): takes [{', '.join(names)}], {kinds}, got {args!r} (nc={values[0]!r})")
        _check_head_strides(i, spec.name, sources, strides)
        kwargs = {"act": self.act} if (self.act is not None and spec.takes_act) else {}
        module = spec.cls(values[0], list(chans), list(strides), *values[1:], **kwargs)
        return module, None, None, [values[0], list(chans), *values[1:]]


def _check_head_strides(i: int, name: str, sources: list[int], strides: tuple) -> None:
    """Every head input must have a positive stride (the network input itself has stride 1)."""
    for j, s in zip(sources, strides):
        if not s > 0:
            raise ModelConfigError(f"layer {i} ({name}): input layer {j} has a non-positive stride {s:g}")


def row_spec(name: str, has_anchors: bool) -> ModuleSpec:
    """The registered module a yaml row named `name` builds (ValueError if unknown).

    YOLOv8 files write the anchor-free head as Detect: in a config without `anchors` such a row builds its
    `without_anchors` module."""
    spec = get_module(name)
    return get_module(spec.without_anchors) if spec.without_anchors is not None and not has_anchors else spec


def config_head(cfg: dict) -> type[nn.Module]:
    """The class the last row of a model config builds (its head), read without building anything; one-line errors."""
    rows = cfg.get("head") if isinstance(cfg, dict) else None
    if not isinstance(rows, list) or not rows or not isinstance(rows[-1], (list, tuple)) or len(rows[-1]) < 3:
        raise ModelConfigError("model config: 'head' must be a non-empty list of [from, number, module, args] rows")
    try:
        return row_spec(str(rows[-1][2]), "anchors" in cfg).cls
    except ValueError as e:
        raise ModelConfigError(f"model config: last row: {e}") from None


def parse_model(cfg: dict, ch: int = 3, size_limits: ModelLimits | None = None) -> ParsedModel:
    """Build layers from a YOLOv5/YOLOv8 model dict (backbone + head rows), splicing list-returning backbones.

    The config is first built on the meta device (no storage) and refused if it exceeds the size limits."""
    check_model_size(cfg, ch, size_limits or ModelLimits.resolve())
    return _parse(cfg, ch)


def check_model_size(cfg: dict, ch: int, size_limits: ModelLimits) -> tuple[int, int]:
    """(parameters, activation elements at 640) of the config, measured without allocating; ModelConfigError past a limit."""
    try:
        with torch.device("meta"):
            built = _parse(cfg, ch)
    except (RuntimeError, OverflowError, MemoryError) as e:  # shapes too large for int64 and the like
        raise ModelConfigError(f"model config: cannot be built, its sizes are out of range ({str(e).splitlines()[0]})") from None
    params = sum(p.numel() for p in built.layers.parameters())
    side = limits.ACTIVATION_SIZE
    acts = int(sum(c * (side / s) ** 2 for c, s in zip(built.channels, built.strides) if c is not None and s))
    if params > size_limits.max_params:
        raise ModelConfigError(
            f"model config: {params:,} parameters exceed the limit of {size_limits.max_params:,} "
            f"(raise it with --max-params or {limits.PARAMS_ENV})"
        )
    if acts > size_limits.max_activations:
        raise ModelConfigError(
            f"model config: {acts:,} activation values per {side}x{side} image exceed the limit of "
            f"{size_limits.max_activations:,} (raise it with {limits.ACTIVATIONS_ENV})"
        )
    return params, acts


def _parse(cfg: dict, ch: int) -> ParsedModel:
    """parse_model without the size check."""
    builder = _Builder(cfg, ch)
    if not isinstance(cfg["backbone"], list) or not isinstance(cfg["head"], list):
        raise ModelConfigError("model config: 'backbone' and 'head' must be lists of rows")
    if len(cfg["backbone"]) + len(cfg["head"]) > limits.MAX_LAYERS:
        raise ModelConfigError(f"model config: {len(cfg['backbone']) + len(cfg['head']):,} rows; the limit is {limits.MAX_LAYERS:,}")
    backbone_end = len(builder.run(cfg["backbone"]).layers)
    built = builder.run(cfg["head"])
    built.backbone_end = backbone_end
    return built


def _check_nc(nc: Any) -> int:
    """The config's class count: an integer from 1 to MAX_CLASSES."""
    if isinstance(nc, bool) or not isinstance(nc, int) or not 1 <= nc <= limits.MAX_CLASSES:
        raise ModelConfigError(f"model config: nc (the number of classes) must be an integer from 1 to {limits.MAX_CLASSES:,}, got {nc!r}")
    return nc
