"""DetectionModel: layers built from a yaml config by parse_model, routed by layer index, ending in any registered Head.

Head-agnostic: the head classes (models/heads/) register themselves and parse_model builds the one a config names.
ClassificationModel is YOLOv5's name for a model whose head is Classify. models/yolo.py re-exports DetectionModel,
Model and load_model_config for YOLOv5's `from models.yolo import DetectionModel`.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Union, cast

import torch
import yaml
from torch import nn

from models.flops import count_gflops
from models.heads.base import Head
from models.heads.classify import Classify
from models.limits import ModelLimits
from models.parse import LayerRow, ModelConfigError, parse_model
from models.reparam import reparameterize_model

LOGGER = logging.getLogger("mobile_yolo")
MODELS_DIR = Path(__file__).resolve().parent


def _route_input(x: Any, route: int | list[int], outputs: list[Any]) -> Any:
    """A layer's input: the previous output (-1), a saved layer's output, or a list of them."""
    if isinstance(route, list):
        return [x if j == -1 else outputs[j] for j in route]
    return x if route == -1 else outputs[route]


def load_model_config(cfg: Union[str, Path, dict]) -> dict:
    """Read a model yaml (path, bare name under models/, or dict) into a fresh dict."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    path = Path(cfg)
    if not path.exists() and (MODELS_DIR / path.name).exists():
        path = MODELS_DIR / path.name
    if not path.exists():
        raise FileNotFoundError(f"{cfg}: model config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelConfigError(f"{path}: invalid yaml ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: a model config must be a mapping")
    data.setdefault("yaml_file", path.name)
    return data


class DetectionModel(nn.Module):
    """A detection model: layers from parse_model, routed by layer index, ending in a Head (YOLOv5 Detect or another)."""

    stride: torch.Tensor

    def __init__(
        self,
        cfg: Union[str, Path, dict] = "yolov5s.yaml",
        ch: int = 3,
        nc: int | None = None,
        anchors: Any = None,
        max_params: int | None = None,
    ) -> None:
        """`max_params` raises or lowers the size limit (models/limits.py) for this model; None reads the environment."""
        super().__init__()
        self.yaml = load_model_config(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = int(nc)
        if anchors is not None:
            self.yaml["anchors"] = anchors
        self.yaml["ch"] = ch
        built = parse_model(self.yaml, ch, ModelLimits.resolve(max_params))
        last = built.layers[-1]
        if not isinstance(last, Head):
            raise ModelConfigError(f"model config: the last layer must be a detection head (Detect), got {type(last).__name__}")
        if built.scale is not None:
            self.yaml["scale"] = built.scale  # the scale picked from the file name stays with the config (checkpoints)
        self.model = built.layers
        self.routes = built.routes
        self.save = sorted(built.save)
        self.layer_rows: list[LayerRow] = built.rows
        self.backbone_end = built.backbone_end  # layers 0 .. backbone_end - 1 came from the `backbone:` rows
        self.register_buffer("stride", last.stride.clone(), persistent=False)
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.check_strides()

    @property
    def head(self) -> Head:
        """The detection head (last layer)."""
        return cast(Head, self.model[-1])

    @property
    def detect(self) -> Head:
        """Alias of `head` (the YOLOv5 name)."""
        return self.head

    @property
    def head_kind(self) -> str:
        """The head's registry kind, e.g. "anchor_based" or "anchor_free"."""
        return self.head.kind

    @property
    def task(self) -> str:
        """The task its head belongs to (its HeadPolicy's): "detect", "segment", "classify"."""
        return self.head.policy.task

    def forward(self, x: torch.Tensor, augment: bool = False, targets: torch.Tensor | None = None) -> Any:
        """Eval: the head's inference output; training: its raw output. `targets` reach a head that trains with them
        (RT-DETR's denoising queries); other heads ignore them."""
        if augment:
            from models.tta import forward_augment

            return forward_augment(self, x)
        return self.forward_once(x, targets)

    def forward_once(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        """Run every layer, feeding each the outputs its route names and keeping only saved ones."""
        outputs: list[Any] = []
        keep = set(self.save)
        last = len(self.model) - 1
        for i, (layer, route) in enumerate(zip(self.model, self.routes)):
            inputs = _route_input(x, route, outputs)
            x = layer(inputs, targets) if i == last and targets is not None and self.head.uses_targets else layer(inputs)
            outputs.append(x if i in keep else None)
        return x

    def check_strides(self) -> None:
        """Dry-run a small zero image (no grad, eval mode, modes restored) and check each head input's real stride."""
        declared = self.detect.stride.tolist()
        small = max(64, 2 * math.ceil(max(declared)))
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                try:
                    size, maps = small, self._detect_inputs(small)
                except ModelConfigError:  # a layer may need larger maps than 2x the largest stride gives: retry once
                    size = max(640, 4 * small)
                    maps = self._detect_inputs(size)
        finally:
            for m, mode in modes:
                m.training = mode
        route = self.routes[-1] if isinstance(self.routes[-1], list) else [self.routes[-1]]
        for j, (src, s, fmap) in enumerate(zip(route, declared, maps)):
            h, w = fmap.shape[-2:]
            if abs(h - size / s) >= 1 or abs(w - size / s) >= 1:
                k = len(self.model) - 2 if src == -1 else src
                real = f"{size / h:g}" + (" or more" if h == 1 else "")
                raise ModelConfigError(
                    f"layer {k} ({self.layer_rows[k].module}): Detect input {j} is declared at stride {s:g} "
                    f"but the built layers give stride {real} (a {size}x{size} dry run gave a {h}x{w} map)"
                )

    def _detect_inputs(self, size: int) -> list[torch.Tensor]:
        """Run every layer before the head on a 1 x ch x size x size zero image and return the head's inputs."""
        p = next(self.parameters(), torch.zeros(()))
        x: Any = torch.zeros(1, self.yaml["ch"], size, size, device=p.device, dtype=p.dtype)
        outputs: list[Any] = []
        keep = set(self.save)
        for i, (layer, route) in enumerate(zip(self.model[:-1], self.routes)):
            try:
                x = layer(_route_input(x, route, outputs))
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                name = self.layer_rows[i].module
                raise ModelConfigError(f"layer {i} ({name}): dry run on a {size}x{size} input failed: {first}") from None
            outputs.append(x if i in keep else None)
        inputs = _route_input(x, self.routes[-1], outputs)
        return inputs if isinstance(inputs, list) else [inputs]

    def fuse(self) -> DetectionModel:
        """Convert to inference form in place: fold Conv+BN and re-parameterise multi-branch blocks."""
        reparameterize_model(self)
        return self

    def info(self, verbose: bool = False, imgsz: int | tuple[int, int] = 640) -> str:
        """Log (and return) a per-layer table when verbose, and the one-line summary."""
        lines = []
        if verbose:
            lines.append(f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<30}{'arguments':<30}")
            for r in self.layer_rows:
                lines.append(f"{r.index:>3}{str(r.source):>18}{r.repeats:>3}{r.params:10,}  {r.module:<30}{str(r.args)[:60]:<30}")
        n_p = sum(p.numel() for p in self.parameters())
        n_g = sum(p.numel() for p in self.parameters() if p.requires_grad)
        layers = len(list(self.modules()))
        gflops = count_gflops(self, imgsz)
        name = Path(self.yaml.get("yaml_file", "model")).stem
        lines.append(f"{name} summary: {layers} layers, {n_p:,} parameters, {n_g:,} gradients, {gflops:.1f} GFLOPs")
        text = "\n".join(lines)
        LOGGER.info(text)
        return text


Model = DetectionModel


class ClassificationModel(DetectionModel):
    """A model built like DetectionModel whose last layer must be Classify (YOLOv5's name for image classifiers)."""

    def __init__(self, cfg: Union[str, Path, dict] = "yolov5s-cls.yaml", ch: int = 3, nc: int | None = None) -> None:
        super().__init__(cfg, ch, nc)
        if not isinstance(self.head, Classify):
            raise ModelConfigError(f"model config: a classifier's last layer must be Classify, got {type(self.head).__name__}")
