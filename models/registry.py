"""Explicit name -> module registry used by parse_model instead of eval().

It imports no model file: the built-in modules register themselves when the `models` package is imported
(models/__init__.py lists them), so importing any models.* module makes them available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

# How parse_model treats a module's yaml arguments, channels and stride.
# "detect": YOLOv5's anchor-based Detect(nc, anchors, ch, strides); "segment": YOLOv5's Segment(nc, anchors, nm, npr, ch,
# strides); "head": any other head, built as cls(nc, ch, strides, *further yaml arguments); "keep": cls(c1, *args),
# keeping channels and stride (AIFI).
KINDS = ("conv", "csp", "concat", "upsample", "pool", "pad", "norm", "detect", "segment", "head", "backbone", "shape", "keep")


@dataclass(frozen=True)
class ModuleSpec:
    """A registered yaml module: its class and how parse_model handles it."""

    name: str
    cls: type[nn.Module]
    kind: str
    takes_act: bool = False
    stride_arg: int | None = None  # index of the stride in the built argument list (c1, c2, ...)
    stride_mult: int = 1  # fixed extra downsampling (Focus's space-to-depth)
    without_anchors: str | None = None  # a "detect" row in a config without `anchors` builds this registered name instead


_REGISTRY: dict[str, ModuleSpec] = {}


def register_module(name: str, kind: str, **options: object) -> Callable[[type], type]:
    """Class decorator: make `cls` available to yaml configs under `name` (options as in ModuleSpec)."""

    def wrap(cls: type) -> type:
        add_module(name, cls, kind, **options)
        return cls

    return wrap


def add_module(name: str, cls: type[nn.Module], kind: str, **options: object) -> None:
    """Register `cls` under `name`; duplicate names and unknown kinds raise ValueError."""
    if kind not in KINDS:
        raise ValueError(f"unknown module kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if name in _REGISTRY:
        raise ValueError(f"module name {name!r} is already registered; known: {known_modules()}")
    _REGISTRY[name] = ModuleSpec(name, cls, kind, **options)  # type: ignore[arg-type]


def remove_module(name: str) -> None:
    """Unregister `name` (used by tests that register temporary modules)."""
    if name not in _REGISTRY:
        raise ValueError(f"module name {name!r} is not registered; known: {known_modules()}")
    del _REGISTRY[name]


def get_module(name: str) -> ModuleSpec:
    """Look up a yaml module name; unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown module {name!r}; known: {known_modules()}")
    return _REGISTRY[name]


def registered(kind: str) -> list[ModuleSpec]:
    """Every registered module of one kind (e.g. "backbone"), sorted by name: what registry-wide tests iterate over."""
    if kind not in KINDS:
        raise ValueError(f"unknown module kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return [spec for name, spec in sorted(_REGISTRY.items()) if spec.kind == kind]


def known_modules() -> str:
    """Comma-separated sorted list of registered names (for error messages)."""
    return ", ".join(sorted(_REGISTRY))

