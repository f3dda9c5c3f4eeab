"""Base class for list-returning backbones that parse_model splices into the YOLOv5 layer list."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from models.registry import add_module


class Backbone(nn.Module):
    """A feature extractor returning one map per entry of `strides`, with `out_channels` declared statically.

    Subclasses set `out_channels` and `strides` (tuples, same length, strides increasing) in
    `__init__` from their architecture tables, never by running a dummy forward pass.
    """

    out_channels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def variant_name(family: str, variant: str) -> str:
    """The yaml name of one variant: family name + the variant in CamelCase ("MobileNetV4", "conv_small" -> "MobileNetV4ConvSmall")."""
    return family + "".join(part[:1].upper() + part[1:] for part in variant.split("_"))


def register_variants(family: type[Backbone], name: str, variants: Iterable[str]) -> list[str]:
    """Register `name` for the family (variant as first argument) and one argument-free name per variant; returns them.

    A variant's class is a subclass of the family whose constructor fixes the variant and keeps the keyword knobs,
    so a yaml row `[-1, 1, MobileOneS0, []]` needs no arguments and isinstance checks still see the family.
    """
    add_module(name, family, kind="backbone")
    names = []
    for variant in variants:
        cls = type(
            variant_name(name, variant),
            (family,),
            {"__init__": _fixed_variant_init(family, variant), "__module__": family.__module__,
             "__doc__": f"{name} backbone, variant {variant!r} (keyword arguments as {name}'s)."},
        )
        add_module(cls.__name__, cls, kind="backbone")
        names.append(cls.__name__)
    return names


def _fixed_variant_init(family: type[Backbone], variant: str) -> Callable[..., None]:
    """A constructor that passes `variant` first and only keyword arguments after it."""

    def __init__(self: Backbone, **knobs: Any) -> None:
        family.__init__(self, variant, **knobs)

    return __init__


class FeatureSelect(nn.Module):
    """Picks feature map `index` from a backbone's output list (fills layer indices after the backbone)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip {"state_dict": ...} / {"model": ...} wrappers and DataParallel's "module." prefix."""
    while True:
        inner = next((state_dict[k] for k in ("state_dict", "model") if k in state_dict), None)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if not isinstance(inner, dict):
            break
        state_dict = inner
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
