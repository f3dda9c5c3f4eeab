"""The head contract every head implements, its policy (what the loops above models/ need to know), and the registry
that maps a head kind to its class.

A head's `kind` travels in export metadata; `LEGACY_HEAD_KIND` names the head of files written before heads were named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

HeadT = TypeVar("HeadT", bound="Head")
LEGACY_HEAD_KIND = "anchor_based"  # files exported before the head kind was recorded all had YOLOv5's Detect


@dataclass(frozen=True)
class HeadPolicy:
    """How a head trains and deploys, as plain data: models/ imports nothing from utils/, the engine and exporter read it.

    Every field has a meaning for every head; there is no fallback for a head without a policy (registration refuses it).
    """

    task: str  # the task that trains, validates, predicts and exports it (utils.tasks registry name)
    title: str  # what messages call its models: "{title} models export to ..."
    hyp_file: str  # hyperparameter file under data/hyps/ when --hyp is not given
    optimizer: str = "SGD"  # what --optimizer auto picks
    close_mosaic_share: float = 0.0  # --close-mosaic 0 means this share of the epochs (at most 10); 0: keep mosaic to the end
    export_formats: tuple[str, ...] | None = None  # formats whose converter and runtime handle its outputs; None: all
    export_refusals: tuple[tuple[str, str], ...] = ()  # (format, one-line reason naming the blocking op) for formats left out
    min_opset: int = 0  # lowest ONNX opset its graph exports with
    dynamic_export: bool = True  # whether --dynamic shapes export (False: sizes are built into the graph)
    nms_export: bool = True  # whether --nms can put NMS in the graph (False: NMS-free, or outputs NMS cannot take)
    int8_formats: tuple[str, ...] | None = None  # formats whose --int8 file keeps its outputs usable; None: every one it exports to
    int8_reason: str = ""  # the one-line reason given when --int8 is refused for a format outside int8_formats
    evolve_table: str | None = None  # name of evolve's mutation table for its loss gains; None: --evolve is refused
    nms_reason: str = ""  # the one-line reason given when --nms is refused
    tta_reason: str = ""  # why --augment (TTA) cannot merge its passes; empty: TTA is supported

    def allows_int8(self, fmt: str) -> bool:
        """Whether `export.py --int8` may write format `fmt` for this head."""
        return self.int8_formats is None or fmt in self.int8_formats


class Head(nn.Module):
    """Base class of detection heads: names the output layout and loss terms, and decodes its inference output.

    Instances provide `nc` (classes), `nl` (input levels) and the `stride` buffer (float, one value per level).
    """

    kind: ClassVar[str] = ""  # registry key, checkpoint/export metadata, loss selection
    export_layout: ClassVar[str] = ""  # human-readable shape of the exported (first eval) output
    anchor_axis: ClassVar[int] = 1  # the axis of that output that runs over predictions (dynamic in ONNX, split by TTA)
    nms_free: ClassVar[bool] = False  # one prediction per object (RT-DETR's queries): inference ranks them, no NMS
    final_rows_output: ClassVar[bool] = False  # inference output is final (B, k, 6) rows, the top-k of `ranking_inputs`
    yaml_args: ClassVar[tuple[str, ...]] = ("nc",)  # a generic ("head"-kind) yaml row's arguments, built as cls(nc, ch, strides, *rest)
    uses_targets: ClassVar[bool] = False  # training forward takes the batch's targets too (RT-DETR's denoising queries)
    policy: ClassVar[HeadPolicy]  # every registered head sets one

    nc: int
    nl: int
    stride: torch.Tensor  # buffer, declared for the type checker (nn.Module.__getattr__ is untyped)

    @property
    def max_detections(self) -> int | None:
        """The most objects this head can output for one image (RT-DETR: its queries); None: bounded only by NMS's max_det."""
        return None

    @classmethod
    def output_axes(cls) -> tuple[dict[int, str], ...]:
        """The dynamic axes of each inference output, in order (their number is the head's number of outputs)."""
        return ({0: "batch", cls.anchor_axis: "anchors"},)

    @classmethod
    def inference_outputs(cls, out: Any) -> Any:
        """The inference part of an eval-mode output: the tensor itself, or its first output(s) when it also carries the
        raw training-form maps (one tensor for one output, else a tuple)."""
        n = len(cls.output_axes())
        if not isinstance(out, (tuple, list)):
            return out
        return out[0] if n == 1 else tuple(out[:n])

    def ranking_inputs(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A final-rows head's (B, N, 4) xyxy boxes and (B, N, nc) scores, from its raw eval output, before its top-k
        (exporters whose runtime has no TopK rank them with their own layer)."""
        raise NotImplementedError(f"{type(self).__name__} outputs no final rows (final_rows_output is False)")

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference output with `nm` extra values per box (e.g. mask coefficients) -> (boxes xyxy pixels (B, N, 4),
        class scores (B, N, nc), extras (B, N, nm)); pure tensor maths, so exported files decode without a module."""
        raise NotImplementedError


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes (..., 4) to corner boxes (..., 4); kept here because models/ may not import utils/."""
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def check_output_width(pred: torch.Tensor, axis: int, least: int, layout: str) -> None:
    """Raise ValueError unless `pred` is 3-d with at least `least` box+score entries along `axis`."""
    if pred.dim() != 3 or pred.shape[axis] < least:
        raise ValueError(f"split_output: expected a {layout} tensor with at least {least} entries on axis {axis}, got {tuple(pred.shape)}")


_HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[HeadT]) -> type[HeadT]:
    """Class decorator: register a Head subclass under its `kind` (empty or duplicate kinds raise ValueError)."""
    kind = getattr(cls, "kind", "")
    if not isinstance(cls, type) or not issubclass(cls, Head) or not kind:
        raise ValueError(f"register_head: {cls!r} must be a Head subclass with a non-empty kind")
    if not isinstance(cls.__dict__.get("policy"), HeadPolicy):
        raise ValueError(f"register_head: {cls.__name__} must declare its own `policy` (a HeadPolicy), not inherit one")
    if kind in _HEADS and _HEADS[kind] is not cls:
        raise ValueError(f"head kind {kind!r} is already registered to {_HEADS[kind].__name__}")
    _HEADS[kind] = cls
    return cls


def head_class(kind: str) -> type[Head]:
    """The Head class registered for `kind`; unknown kinds raise ValueError listing the known ones."""
    if not isinstance(kind, str) or kind not in _HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(known_heads())}")
    return _HEADS[kind]


def head_policy(kind: str) -> HeadPolicy:
    """The policy of the head registered for `kind`; unknown kinds raise ValueError listing the known ones."""
    return head_class(kind).policy


def known_heads() -> tuple[str, ...]:
    """Registered head kinds, sorted."""
    return tuple(sorted(_HEADS))
