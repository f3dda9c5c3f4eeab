"""One inference interface over .pt checkpoints and exported TorchScript, ONNX, OpenVINO, NCNN and TFLite models."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
import yaml
from torch import nn

from models.heads.base import LEGACY_HEAD_KIND, head_class, head_policy
from models.model import DetectionModel
from utils.device import select_device
from utils.nms import END2END

LOGGER = logging.getLogger("mobile_yolo")
SUPPORTED = ("PyTorch .pt, TorchScript .torchscript, ONNX .onnx, OpenVINO *_openvino_model/ or .xml, NCNN *_ncnn_model/ or .param, "
             "TFLite .tflite")


def _names_from(value: Any) -> list[str] | None:
    """Class names from a list, an {index: name} dict, or their JSON / Python-literal text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)  # YOLOv5 writes dict reprs; literal_eval evaluates literals only
            except (ValueError, SyntaxError):
                return None
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else None


def _names_from_data(data: Any) -> list[str] | None:
    """Names from a dataset dict or YAML file (read only; nothing is downloaded)."""
    if isinstance(data, (str, Path)) and Path(data).is_file():
        data = yaml.safe_load(Path(data).read_text(encoding="utf-8"))
    return _names_from(data.get("names")) if isinstance(data, dict) else None


def _head_kind(value: Any, weights: Path) -> str:
    """The head kind recorded in the metadata (files exported before heads were named: anchor_based); unknown kinds refused."""
    kind = str(value) if value else LEGACY_HEAD_KIND
    try:
        head_class(kind)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return kind


def _first_or_all(outputs: list[Any]) -> Any:
    """A runtime's outputs: the one array of a detector, or all of them (a segmentation model's detections and prototypes)."""
    return outputs[0] if len(outputs) == 1 else outputs


class DetectBackend(nn.Module):
    """Load any supported weights by suffix; calling it maps a (B,3,H,W) 0-1 image batch to the head's inference output.

    That output is decoded by `non_max_suppression(..., head=backend.head_kind)` whatever the format.
    """

    def __init__(
        self, weights: Union[str, Path, nn.Module], device: Union[str, torch.device] = "cpu", fp16: bool = False, data: Any = None
    ) -> None:
        super().__init__()
        module = weights if isinstance(weights, nn.Module) else None  # a DetectionModel built in memory (torch.hub configs)
        if isinstance(weights, (list, tuple)):
            weights = weights[0]
        self.weights = Path("model.pt") if isinstance(weights, nn.Module) else Path(weights)
        self.device = select_device(device)
        self.fp16 = bool(fp16) and self.device.type == "cuda"
        self.format = "pt" if module is not None else self._detect_format(self.weights)
        self.pt, self.jit, self.onnx, self.xml = (self.format == f for f in ("pt", "torchscript", "onnx", "openvino"))
        self.input_shape: tuple[int, ...] | None = None  # fixed (B,3,H,W) of static exports
        self.dynamic = True
        self._in_dtype = np.float16 if self.fp16 else np.float32
        self._warned_augment = False
        self._run: Callable[[np.ndarray], Any]  # numpy runtimes (ONNX Runtime, OpenVINO, NCNN): batch in, output out
        meta = self._load_module(module) if module is not None else getattr(self, f"_load_{self.format}")()
        self.stride = int(meta.get("stride") or 32)
        self.names = _names_from(meta.get("names")) or _names_from_data(data) or []
        self.head_kind = _head_kind(meta.get("head"), self.weights)
        self.task = str(meta.get("task") or head_policy(self.head_kind).task)  # files written before tasks were recorded
        if meta.get("nms"):  # NMS inside the graph (export.py --nms): the output is final detections
            self.head_kind = END2END
        self.metadata = meta

    @staticmethod
    def _detect_format(w: Path) -> str:
        """Backend name from the path; unknown suffixes are a one-line ValueError."""
        if w.suffix == ".pt":
            return "pt"
        if w.suffix == ".torchscript":
            return "torchscript"
        if w.suffix == ".onnx":
            return "onnx"
        if w.suffix == ".xml" or w.name.endswith("_openvino_model"):
            return "openvino"
        if w.suffix == ".param" or w.name.endswith("_ncnn_model"):
            return "ncnn"
        if w.suffix == ".tflite":
            return "tflite"
        if w.suffix == ".mlpackage":
            raise ValueError(f"{w}: Core ML models run only on Apple systems (the Core ML runtime); run the .onnx or .tflite here")
        raise ValueError(f"{w}: unsupported weights format '{w.suffix or w.name}'; supported: {SUPPORTED}")

    def _require_file(self) -> None:
        if not self.weights.exists():
            raise FileNotFoundError(f"{self.weights}: weights not found")

    def _load_pt(self) -> dict:
        from utils.checkpoint import load_model

        return self._load_module(load_model(self.weights, device=self.device))

    def _load_module(self, model: nn.Module) -> dict:
        """Run a DetectionModel in its inference form: eval, fused (Conv+BN folded, re-parameterised), on the device."""
        if not isinstance(model, DetectionModel):
            raise TypeError(f"DetectBackend runs a DetectionModel or a weights path, got {type(model).__name__}")
        model = model.to(self.device).eval().fuse()
        self.model = model.half() if self.fp16 else model.float()
        return {"stride": int(max(int(model.stride.max()), 32)), "names": list(model.names), "head": model.head_kind,
                "task": model.head.policy.task}

    def _load_torchscript(self) -> dict:
        self._require_file()
        extra = {"config.txt": ""}
        try:
            model = torch.jit.load(str(self.weights), _extra_files=extra, map_location=self.device)
        except RuntimeError as e:
            raise ValueError(f"{self.weights}: not a readable TorchScript file ({str(e).splitlines()[0][:160]})") from None
        meta = json.loads(extra["config.txt"]) if extra["config.txt"] else {}
        if meta.get("nms") and meta.get("imgsz") and meta.get("batch"):  # traced NMS loops over the traced batch: keep it
            self._set_shape([int(meta["batch"]), 3, *map(int, meta["imgsz"])])
        self.model = (model.half() if self.fp16 else model.float()).eval()
        if meta.get("half"):
            self.model, self.fp16 = self.model.half(), True
        return meta

    def _load_onnx(self) -> dict:
        import onnxruntime as ort

        self._require_file()
        providers: list[Any] = ["CPUExecutionProvider"]  # names, or (name, options) pairs
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        try:
            self.session = ort.InferenceSession(str(self.weights), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{self.weights}: ONNX Runtime cannot load the model ({str(e).splitlines()[0][:160]})") from None
        inp = self.session.get_inputs()[0]
        self._input_name, self._in_dtype = inp.name, np.float16 if "float16" in inp.type else np.float32
        self._set_shape(inp.shape)
        self._run = lambda x: _first_or_all(self.session.run(None, {self._input_name: x}))
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def _load_openvino(self) -> dict:
        from utils.runtime.openvino import OpenvinoRunner

        runner = OpenvinoRunner(self.weights)
        self._set_shape(runner.input_shape)
        self.compiled = runner.compiled
        self._run = lambda x: _first_or_all(runner(x))
        return runner.metadata

    def _load_tflite(self) -> dict:
        from utils.runtime.tflite import TfliteRunner

        self._require_file()
        runner = TfliteRunner(self.weights)
        self._set_shape(runner.input_shape)
        self._run = runner
        return runner.metadata

    def _load_ncnn(self) -> dict:
        from utils.runtime.ncnn import NcnnRunner

        runner = NcnnRunner(self.weights)
        self._set_shape(runner.input_shape or ())
        self._run = runner
        return runner.metadata

    def _set_shape(self, shape: Any) -> None:
        """Record a fully static (B,3,H,W) input shape; symbolic dims make the model dynamic."""
        static = len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape)
        self.dynamic = not static
        self.input_shape = tuple(int(d) for d in shape) if static else None

    def forward(self, im: torch.Tensor, augment: bool = False) -> Any:
        """(B,3,H,W) float 0-1 -> the head's inference output (e.g. (B,N,5+nc) anchor-based), a tensor on self.device;
        a segmentation model gives (detections (B,N,5+nc+nm), prototypes (B,nm,H/4,W/4))."""
        if self.pt:
            out = self.model(im.half() if self.fp16 else im.float(), augment=augment)
            return self.model.head.inference_outputs(out)
        if augment and not self._warned_augment:
            LOGGER.warning(f"WARNING: test-time augmentation needs a .pt model; running {self.format} without it")
            self._warned_augment = True
        if self.input_shape is not None and im.shape[0] != self.input_shape[0]:
            if self.input_shape[0] != 1:
                raise ValueError(f"{self.weights}: exported for batch {self.input_shape[0]}, got batch {im.shape[0]}")
            parts = [self.forward(im[i : i + 1]) for i in range(im.shape[0])]
            if isinstance(parts[0], tuple):
                return tuple(torch.cat(group, 0) for group in zip(*parts))
            return torch.cat(parts, 0)
        if self.input_shape is not None and tuple(im.shape[2:]) != self.input_shape[2:]:
            h, w = self.input_shape[2:]
            got = f"{im.shape[2]}x{im.shape[3]}"
            raise ValueError(f"{self.weights}: exported for {h}x{w} images, got {got}; re-export or use --imgsz {h} {w}")
        if self.jit:
            return self.model(im.half() if self.fp16 else im.float())
        x = im.detach().cpu().numpy().astype(self._in_dtype, copy=False)
        y = self._run(x)
        if isinstance(y, (list, tuple)):
            return tuple(torch.from_numpy(np.asarray(a)).to(self.device) for a in y)
        return torch.from_numpy(np.asarray(y)).to(self.device)

    @property
    def fixed_imgsz(self) -> tuple[int, int] | None:
        """The (h, w) an export runs at only (static ONNX/OpenVINO inputs, TorchScript traced without --dynamic); None: any."""
        if self.input_shape is not None:
            return int(self.input_shape[2]), int(self.input_shape[3])
        imgsz = self.metadata.get("imgsz")
        if self.jit and not self.metadata.get("dynamic") and isinstance(imgsz, (list, tuple)) and len(imgsz) == 2:
            return int(imgsz[0]), int(imgsz[1])
        return None

    def warmup(self, imgsz: tuple[int, int, int, int] = (1, 3, 640, 640)) -> None:
        """One dummy forward pass (the exported input shape wins over imgsz for static models)."""
        shape = self.input_shape or tuple(imgsz)
        dtype = torch.float16 if self.fp16 and (self.pt or self.jit) else torch.float32
        with torch.no_grad():
            self.forward(torch.zeros(*shape, dtype=dtype, device=self.device))


DetectMultiBackend = DetectBackend
