"""YOLOv5 anchor-based Detect head and DetectionModel (any registered Head last) built from a yaml config through parse_model."""

from __future__ import annotations

if __name__ == "__main__":  # `python models/yolo.py --cfg yolov5s.yaml` as in YOLOv5: layer table, summary, one forward pass
    # Runs models.info and exits before the rest of this file executes as __main__ (it would register Detect twice).
    import sys
    from pathlib import Path as _Path

    _models_dir = _Path(__file__).resolve().parent
    _root = str(_models_dir.parent)  # on sys.path instead of models/ (the script's folder), so `models.*` imports resolve
    if sys.path and _Path(sys.path[0] or ".").resolve() == _models_dir:
        sys.path[0] = _root
    else:  # e.g. python -P, which does not prepend the script's folder
        sys.path.insert(0, _root)
    from models.info import main as _info_main

    raise SystemExit(_info_main(layer_table=True))

import copy
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Union, cast

import torch
import yaml
from torch import nn

from models.flops import count_gflops
from models.head import Head, check_output_width, register_head, xywh_to_xyxy
from models.parse import LayerRow, ModelConfigError, parse_model
from models.registry import register_module
from models.reparam import reparameterize_model

LOGGER = logging.getLogger("mobile_yolo")
MODELS_DIR = Path(__file__).resolve().parent


@register_head
@register_module("Detect", kind="detect", without_anchors="AnchorFreeDetect")
class Detect(Head):
    """Anchor-based head: one 1x1 conv per level; raw maps in training, decoded pixel boxes in eval."""

    kind: ClassVar[str] = "anchor_based"
    export_layout: ClassVar[str] = "(batch, anchors, 5 + nc)"

    anchors: torch.Tensor  # buffer, declared for the type checker

    def __init__(
        self, nc: int = 80, anchors: list | tuple = (), ch: list | tuple = (), strides: list | tuple = (), *, nm: int = 0
    ) -> None:
        """`nm` extra raw (never sigmoided) outputs per anchor follow the class scores, e.g. Segment's mask coefficients."""
        super().__init__()
        if len(strides) != len(anchors) or len(ch) != len(anchors):
            raise ValueError(f"{type(self).__name__}: {len(anchors)} anchor levels, {len(ch)} inputs and {len(strides)} strides must agree")
        self.nc = nc
        self.nm = nm
        self.no = nc + 5 + nm
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        stride = torch.tensor([float(s) for s in strides])
        pixels = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("stride", stride, persistent=False)
        self.register_buffer("anchors", _order_anchors(pixels, stride) / stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._initialize_biases()

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        """YOLOv5 priors: ~8 objects per 640 image for objectness, 0.6/(nc-0.99) for classes."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = cast(torch.Tensor, cast(nn.Conv2d, conv).bias).view(self.na, -1)  # head convs are built with bias=True
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw, decoded = self._levels(xs)
        return raw if decoded is None else (decoded, raw)

    def _levels(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-level raw maps (B, na, ny, nx, no), and in eval mode all levels decoded into one (B, N, no) tensor."""
        raw, decoded = [], []
        for i in range(self.nl):
            p = self.m[i](xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                decoded.append(self._decode(p, i))
        return raw, None if self.training else torch.cat(decoded, 1)

    def _decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Map one level's raw output to (B, na*ny*nx, no) xywh pixels + sigmoid scores (+ the nm extras, raw)."""
        bs, na, ny, nx, no = p.shape
        ys = torch.arange(ny, device=p.device, dtype=p.dtype)
        xs = torch.arange(nx, device=p.device, dtype=p.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, na, 1, 1, 2).to(p.dtype)
        y = p.sigmoid() if not self.nm else torch.cat((p[..., : -self.nm].sigmoid(), p[..., -self.nm :]), 4)
        xy, wh, rest = y.split((2, 2, no - 4), 4)  # rest: objectness, classes (and the nm raw extras)
        xy = (xy * 2 + grid) * self.stride[i].to(p.dtype)
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, rest), 4).reshape(bs, -1, no)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 5 + nc + nm) xywh + objectness + classes -> (xyxy boxes, cls * obj scores, the nm extra columns)."""
        check_output_width(pred, 2, 6 + nm, "(batch, anchors, 5 + nc)")
        nc = pred.shape[2] - 5 - nm
        return xywh_to_xyxy(pred[..., :4]), pred[..., 5 : 5 + nc] * pred[..., 4:5], pred[..., 5 + nc :]


def _order_anchors(anchors: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """Flip the anchor levels if their mean area order disagrees with the stride order."""
    area = anchors.prod(-1).mean(-1)
    if (area[-1] - area[0]).sign() != (stride[-1] - stride[0]).sign() and len(area) > 1:
        LOGGER.info("Detect: reversing anchor order to match strides")
        return anchors.flip(0)
    return anchors


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

    def __init__(self, cfg: Union[str, Path, dict] = "yolov5s.yaml", ch: int = 3, nc: int | None = None, anchors: Any = None) -> None:
        super().__init__()
        self.yaml = load_model_config(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = int(nc)
        if anchors is not None:
            self.yaml["anchors"] = anchors
        self.yaml["ch"] = ch
        built = parse_model(self.yaml, ch)
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
        """"segment" when the head is YOLOv5's Segment (masks from prototypes), else "detect"."""
        return "segment" if self.head.kind == "segment" else "detect"

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
