"""Load ImageNet backbone weights (timm or Apple checkpoints, local file or timm name) into a detector's backbone."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union, cast

import torch
from torch import nn

from models.backbone import Backbone
from models.registry import get_module

LOGGER = logging.getLogger("mobile_yolo")
TIMM_PREFIX = "timm:"
HUB_HOST = ("huggingface.co", 443)


# A backbone's convert_state_dict: checkpoint state_dict -> (tensors mapped to our keys, unused checkpoint keys).
_StateDictConverter = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[str]]]


class BackboneWeightsError(ValueError):
    """Backbone weights that cannot be found, read or matched; the message is one line."""


@dataclass
class BackboneLoadReport:
    """What a backbone weight load did: tensors loaded, our keys left at init, checkpoint keys not used."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        tail = f", unused {len(self.unused)} (e.g. {', '.join(self.unused[:3])})" if self.unused else ""
        miss = f", missing {len(self.missing)} (e.g. {', '.join(self.missing[:3])})" if self.missing else ""
        return f"backbone weights: loaded {self.loaded} tensors from {self.source}{miss}{tail}"


def find_backbone(model: nn.Module) -> Backbone:
    """The first list-returning backbone inside `model` (a DetectionModel or a bare backbone)."""
    for module in model.modules():
        if isinstance(module, Backbone) and hasattr(module, "convert_state_dict"):
            return module
    raise BackboneWeightsError("model has no MobileNetV4/MobileOne backbone to load weights into")


def read_weights_file(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a .pt/.pth/.bin (weights_only) or .safetensors state_dict from disk."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise BackboneWeightsError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    except Exception as e:  # unpickler and safetensors raise many types on foreign or corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackboneWeightsError(f"{path}: not a readable weights file ({first[:160]})") from None
    if not isinstance(data, dict):
        raise BackboneWeightsError(f"{path}: expected a state_dict (a mapping of tensors), got {type(data).__name__}")
    return data


def fetch_timm_state_dict(name: str, timeout: float = 5.0) -> dict[str, torch.Tensor]:
    """Download timm's pretrained weights for model `name` (needs timm and internet)."""
    try:
        import timm
    except ImportError:
        raise BackboneWeightsError(f"{TIMM_PREFIX}{name}: fetching by timm name needs `pip install timm`") from None
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as e:
        raise BackboneWeightsError(
            f"{TIMM_PREFIX}{name}: cannot reach {HUB_HOST[0]} ({e}); download the weights elsewhere and pass the file path"
        ) from None
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # hub and network errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackboneWeightsError(f"{TIMM_PREFIX}{name}: download failed ({first[:160]})") from None


def checkpoint_backbone_state(ckpt: dict, source: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of one of this project's checkpoints (a classifier from classify/train.py, or a detector), EMA
    weights when it has them, with keys relative to the backbone layer."""
    state = ckpt.get("ema") or ckpt["model"]
    rows = ckpt["cfg"].get("backbone") if isinstance(ckpt.get("cfg"), dict) else None
    index = next((i for i, row in enumerate(rows or []) if _is_backbone_row(row)), None)
    if index is None or not isinstance(state, dict):
        raise BackboneWeightsError(f"{source}: its model has no MobileNetV4/MobileOne backbone row to take weights from")
    prefix = f"model.{index}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_backbone_row(row: object) -> bool:
    """Whether a yaml row [from, number, module, args] builds a registered list-returning backbone."""
    if not isinstance(row, (list, tuple)) or len(row) < 3 or not isinstance(row[2], str):
        return False
    try:
        return get_module(row[2]).kind == "backbone"
    except ValueError:
        return False


def load_backbone_weights(model: nn.Module, source: Union[str, Path]) -> BackboneLoadReport:
    """Map timm/Apple/own backbone weights from `source` (file path or 'timm:<name>') onto the model's backbone; one of
    this project's checkpoints (e.g. a classifier's best.pt) gives its backbone layer's weights."""
    source = str(source)
    if source.startswith(TIMM_PREFIX):
        state_dict = fetch_timm_state_dict(source[len(TIMM_PREFIX) :])
    else:
        state_dict = read_weights_file(source)
        if "cfg" in state_dict and "model" in state_dict:  # this project's checkpoint layout (utils/checkpoint.py)
            state_dict = checkpoint_backbone_state(state_dict, source)
    backbone = find_backbone(model)
    convert = cast(_StateDictConverter, backbone.convert_state_dict)  # find_backbone checked that it exists
    mapped, unused = convert(state_dict)
    if not mapped:
        raise BackboneWeightsError(
            f"{source}: no tensor matches the {type(backbone).__name__} backbone (wrong family or variant?)"
        )
    result = backbone.load_state_dict(mapped, strict=False)
    report = BackboneLoadReport(source, len(mapped), list(result.missing_keys), sorted(unused))
    LOGGER.info(report.summary())
    return report
