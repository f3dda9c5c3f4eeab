"""YOLO(...): one object that trains, validates, predicts, tracks and exports, as ultralytics' model object does.

Each method runs the scripts' own code (train.py's Trainer, val.py's run, detect.py's prediction path, export.py's
exporter), so a number from the object equals the script's for the same settings. Prediction defaults are detect.py's
(conf 0.25, iou 0.45, max_det 1000), not ultralytics' (iou 0.7, max_det 300).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Union, cast

import numpy as np
import torch

from models.model import DetectionModel
from utils.data.images import check_some_succeeded, skip_failed_image
from utils.inference.image_results import Results
from utils.inference.predict import VideoSink, check_options, default_source, load_predictor, save_prediction
from utils.inference.predictor import Prediction, open_any_source, predictions
from utils.inference.tracking import PredictionTracker
from utils.paths import ROOT, increment_path
from utils.predictions import describe
from utils.runtime.backend import DetectBackend
from utils.tasks import Task, task_of

LOGGER = logging.getLogger("mobile_yolo")
Source = Union[str, Path, int, np.ndarray, Any, list]
PREDICTS = "detect"  # the task whose prediction path the object runs (detect.py's, which draws masks too); others are refused


@dataclass
class Metrics:
    """What val() measured: the task's metric columns by name, per-class mAP50-95 and the speed in ms per image.

    `box` (mp, mr, map50, map, maps) and, for segmentation, `seg` give ultralytics' attribute names."""

    values: dict[str, float]
    maps: np.ndarray
    speed: dict[str, float] = field(default_factory=dict)

    def _group(self, suffix: str) -> SimpleNamespace:
        names = ("mp", "mr", "map50", "map")
        cols = [k for k in self.values if k.endswith(suffix)] if suffix else list(self.values)[:4]
        return SimpleNamespace(**dict(zip(names, (self.values[c] for c in cols[:4]))), maps=self.maps)

    @property
    def box(self) -> SimpleNamespace:
        """Box precision, recall, mAP50, mAP50-95 (mp, mr, map50, map) and per-class mAP50-95 (maps)."""
        return self._group("(B)" if any(k.endswith("(B)") for k in self.values) else "")

    @property
    def seg(self) -> SimpleNamespace:
        """Mask metrics of a segmentation model (ValueError for other tasks)."""
        if not any(k.endswith("(M)") for k in self.values):
            raise ValueError("seg: mask metrics exist only for a segmentation model")
        return self._group("(M)")


def _resolve(model: Union[str, Path]) -> tuple[Path | None, Path | None]:
    """(config, weights) from what YOLO() was given: a yaml path, a shipped config name, or a weights file/folder."""
    from utils.inference.hub import config_path

    p = Path(model)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p, None
        return config_path(p.stem), None
    if not p.suffix and not p.exists():
        return config_path(p.name), None  # a shipped config by name: YOLO("yolov5n")
    if not p.exists():
        raise FileNotFoundError(f"{p}: weights not found")
    return None, p


class YOLO:
    """A detector (or segmentation model, classifier) from a config or from weights in any runnable format."""

    def __init__(self, model: Union[str, Path] = "yolov5_mobilenetv4.yaml", device: Union[str, int, None] = None) -> None:
        self.cfg, self.weights = _resolve(model)
        self.device = "" if device is None else str(device)
        self._backend: DetectBackend | None = None
        self._tracker: PredictionTracker | None = None
        self.task: Task = task_of(self.backend)

    @property
    def backend(self) -> DetectBackend:
        """The loaded model, in its inference form (built from the config, untrained, when there are no weights)."""
        if self._backend is None:
            source: Any = self.weights if self.weights is not None else DetectionModel(cast(Path, self.cfg))
            self._backend = DetectBackend(source, device=self.device)
        return self._backend

    @property
    def names(self) -> dict[int, str]:
        """Class names by index, as ultralytics."""
        return dict(enumerate(self.backend.names))

    @property
    def stride(self) -> int:
        return int(self.backend.stride)

    def info(self, imgsz: int = 640) -> str:
        """Parameters, GFLOPs, strides, head and classes (logged and returned)."""
        from utils.inference.hub import describe_model

        if self.backend.pt:
            self.backend.model.yaml.setdefault("yaml_file", str(self.cfg or self.weights))
        text = describe_model(self.backend, imgsz)
        LOGGER.info(text)
        return text

    def train(self, **kwargs: Any) -> Path:
        """Train with train.py's options (ultralytics' `batch` is accepted for --batch-size); from the config, or
        fine-tuning these weights. Returns best.pt (last.pt without validation) and uses it from then on."""
        from utils.engine.launch import train_main
        from utils.engine.options import train_options

        if "batch" in kwargs:
            kwargs["batch_size"] = kwargs.pop("batch")
        if self.weights is not None and self.weights.suffix == ".pt":
            kwargs.setdefault("weights", str(self.weights))
        elif self.cfg is not None:
            kwargs.setdefault("cfg", str(self.cfg))
        else:
            raise ValueError(f"{self.weights}: an exported model cannot be trained; train its .pt checkpoint or a config")
        kwargs.setdefault("device", self.device)
        best = train_main(train_options(self.task.name, **kwargs))
        self.cfg, self.weights, self._backend = None, Path(best), None
        return Path(best)

    def val(self, **kwargs: Any) -> Metrics:
        """val.py's run on these weights (ultralytics' `batch`, `conf`, `iou` accepted); the task's metrics by name."""
        from utils.engine.validation import run

        if self.weights is None:
            raise ValueError(f"{self.cfg}: an untrained model; train() it or load trained weights before val()")
        renames = {"batch": "batch_size", "conf": "conf_thres", "iou": "iou_thres"}
        kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("project", str(ROOT / self.task.val_project))
        kwargs.setdefault("data", self.task.default_data)
        row, maps, speed = run(weights=str(self.weights), script_task=self.task.name, **kwargs)
        values = dict(zip(self.task.metric_columns, (float(v) for v in row)))
        return Metrics(values, np.asarray(maps), dict(zip(("preprocess", "inference", "postprocess"), map(float, speed))))

    def export(self, format: str = "onnx", **kwargs: Any) -> Path:  # noqa: A002  (ultralytics' argument name)
        """export.py's exporter to one format (`batch` accepted for batch_size); returns the file written."""
        from utils.export.exporter import export_model

        if "batch" in kwargs:
            kwargs["batch_size"] = kwargs.pop("batch")
        source: dict[str, Any] = {"weights": str(self.weights)} if self.weights is not None else {"cfg": str(self.cfg)}
        if self.weights is not None and self.weights.suffix != ".pt":
            raise ValueError(f"{self.weights}: export from the .pt checkpoint (this file is already an export)")
        return export_model(**source, include=[format], **kwargs)[0]

    def predict(self, source: Source = None, stream: bool = False, **kwargs: Any) -> Union[list[Results], Iterator[Results]]:
        """Results per image or video frame; with stream=True a generator holding one frame's results at a time.

        Accepts detect.py's sources (files, folders, globs, videos, URLs, webcam index) and numpy BGR arrays, PIL
        images, or lists of them. Options: conf, iou, imgsz, max_det, classes, agnostic_nms, augment, half,
        retina_masks, vid_stride, save, save_txt, save_conf, save_crop, project, name, exist_ok, line_width, verbose."""
        gen = self._results(source, None, **_check_predict_options("predict", kwargs))
        return gen if stream else list(gen)

    __call__ = predict

    def track(self, source: Source = None, stream: bool = False, persist: bool = False, tracker: str = "bytetrack",
              **kwargs: Any) -> Union[list[Results], Iterator[Results]]:
        """predict() with track ids (Results.boxes.id); persist=True keeps the tracker between calls (frame by frame)."""
        if not persist or self._tracker is None:
            self._tracker = PredictionTracker(tracker)
        gen = self._results(source, self._tracker, **_check_predict_options("track", kwargs))
        return gen if stream else list(gen)

    def _results(self, source: Source, follower: PredictionTracker | None, conf: float = 0.25, iou: float = 0.45,
                 imgsz: Any = 640, max_det: int = 1000, classes: list[int] | None = None, agnostic_nms: bool = False,
                 augment: bool = False, half: bool = False, retina_masks: bool = False, vid_stride: int = 1,
                 save: bool = False, verbose: bool = True, **save_options: Any) -> Iterator[Results]:
        """Check the options and open the source now (a bad one fails at the call, not at the first frame), then
        run detect.py's prediction path lazily."""
        check_options(imgsz, conf, iou, max_det, vid_stride, int(save_options.get("line_width") or 0))
        if half and not self.backend.fp16 and self.weights is not None and self.backend.device.type == "cuda":
            self._backend = DetectBackend(self.weights, device=self.device, fp16=True)
        model, step, size = load_predictor(self.backend, self.device, half, imgsz, PREDICTS, augment=augment,
                                           retina_masks=retina_masks, conf_thres=conf, iou_thres=iou, classes=classes,
                                           agnostic=agnostic_nms, max_det=max_det, vid_stride=vid_stride)
        source = default_source() if source is None else source
        dataset = open_any_source(source, size, model.stride, bool(model.pt), vid_stride)
        files = save or any(save_options.get(k) for k in ("save_txt", "save_crop"))
        saver = _Saver(self.task, list(model.names), **save_options) if files else None
        return self._iterate(model, dataset, step, source, follower, saver, save, verbose)

    @staticmethod
    def _iterate(model: DetectBackend, dataset: Any, step: Any, source: Source, follower: PredictionTracker | None,
                 saver: _Saver | None, draw: bool, verbose: bool) -> Iterator[Results]:
        """One Results per image or frame; a frame that fails is skipped with one warning, as detect.py does."""
        names, failures, seen = list(model.names), list[str](), 0
        with torch.no_grad():
            for pred in predictions(model, dataset, step, failures):
                result = None
                with skip_failed_image(pred.name, failures):
                    pred = follower(pred, getattr(dataset, "fps", None)) if follower is not None else pred
                    if saver is not None:
                        saver(pred, dataset, follower, draw=draw)
                    result = to_results(pred, names)
                    seen += 1
                if result is None:
                    continue
                if verbose:
                    LOGGER.info(f"{pred.desc}{pred.input_hw[0]}x{pred.input_hw[1]} {describe(pred.det, names)}, "
                                f"{pred.seconds[1] * 1e3:.1f}ms")
                yield result
        if saver is not None:
            saver.close()
        check_some_succeeded(str(source) if isinstance(source, (str, Path)) else "source", failures, seen)


class _Saver:
    """predict(save=True / save_txt=True): detect.py's files (annotated media, labels, crops, MOT rows) in one run folder."""

    def __init__(self, task: Task, names: list[str], project: Any = None, name: str = "predict", exist_ok: bool = False,
                 save_txt: bool = False, save_conf: bool = False, save_crop: bool = False, line_width: int | None = None) -> None:
        self.save_dir = increment_path(Path(project or ROOT / task.predict_project) / name, exist_ok=exist_ok)
        (self.save_dir / "labels" if save_txt else self.save_dir).mkdir(parents=True, exist_ok=True)
        self.names, self.sink = names, VideoSink()
        self.opts = dict(save_txt=save_txt, save_format=0, save_csv=False, save_conf=save_conf, save_crop=save_crop,
                         view_img=False, nosave=True, line_width=line_width or None, hide_labels=False, hide_conf=False)

    def __call__(self, pred: Prediction, dataset: Any, follower: PredictionTracker | None, draw: bool) -> None:
        save_prediction(pred, dataset, self.save_dir, self.names, {**self.opts, "nosave": not draw}, self.sink)
        if follower is not None:
            follower.save_mot(self.save_dir, pred)

    def close(self) -> None:
        self.sink.close()
        LOGGER.info(f"Results saved to {self.save_dir}")


PREDICT_OPTIONS = ("conf", "iou", "imgsz", "max_det", "classes", "agnostic_nms", "augment", "half", "retina_masks",
                   "vid_stride", "save", "verbose", "project", "name", "exist_ok", "save_txt", "save_conf", "save_crop",
                   "line_width")


def _check_predict_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options, or one ValueError line naming the first unknown one and listing the known ones."""
    unknown = sorted(set(options) - set(PREDICT_OPTIONS))
    if unknown:
        raise ValueError(f"{method}(): unknown option {unknown[0]!r}; known: {', '.join(PREDICT_OPTIONS)}")
    return options


def to_results(pred: Prediction, names: list[str]) -> Results:
    """A Prediction as ultralytics' Results: boxes (n, 6), or (n, 7) x1 y1 x2 y2 id conf cls when tracked."""
    boxes = pred.det if pred.ids is None else torch.cat([pred.det[:, :4], pred.ids[:, None].float(), pred.det[:, 4:6]], 1)
    speed = dict(zip(("preprocess", "inference", "postprocess"), (s * 1e3 for s in pred.seconds)))
    return Results(pred.orig_img, str(pred.path), names, boxes=boxes, masks=pred.masks, speed=speed)
