"""Per-image prediction results in ultralytics 8's shape (Results holding Boxes and Masks), so code written against the
YOLOv8 Python API reads this project's predictions unchanged; they wrap what detect.py computes and run no model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.files import resolve_path, safe_component
from utils.inference.predict import no_display_reason
from utils.plots import Names, draw_detections, draw_masks, names_dict
from utils.predictions import describe, save_crops, write_labels, write_polygon_labels
from utils.segmentation import mask_to_polygon

LOGGER = logging.getLogger("mobile_yolo")

Array = Union[torch.Tensor, np.ndarray]
DataT = TypeVar("DataT", bound="_Data")
BOX_KEYS = ("x1", "y1", "x2", "y2")


def _as_tensor(x: Array) -> torch.Tensor:
    """A torch view of a tensor or numpy array (numpy shares memory)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _as_numpy(x: Array) -> np.ndarray:
    """A numpy view of a tensor or numpy array, for cv2 and the label writers."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _divide(x: Array, gain: tuple[float, ...]) -> Array:
    """x / gain along the last axis, keeping x's kind (torch or numpy) and float dtype."""
    if isinstance(x, torch.Tensor):
        return x / torch.tensor(gain, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return x / np.asarray(gain, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


class _Data:
    """What Boxes and Masks share: one row per detection, in a torch tensor or numpy array, and the image's (h, w)."""

    def __init__(self, data: Array, orig_shape: tuple[int, int]) -> None:
        self.data = data
        self.orig_shape = (int(orig_shape[0]), int(orig_shape[1]))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the underlying data."""
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self: DataT, idx: Any) -> DataT:
        """The selected rows (an index, slice, index list or boolean mask) as the same kind of object."""
        return type(self)(self.data[idx], self.orig_shape)

    def cpu(self: DataT) -> DataT:
        """The same data on the CPU (numpy data is returned as is)."""
        return self if isinstance(self.data, np.ndarray) else type(self)(self.data.cpu(), self.orig_shape)

    def numpy(self: DataT) -> DataT:
        """A copy backed by a numpy array, so every property then returns numpy."""
        return type(self)(np.array(_as_numpy(self.data), copy=True), self.orig_shape)

    def to(self: DataT, *args: Any, **kwargs: Any) -> DataT:
        """A copy moved or cast as torch.Tensor.to(*args, **kwargs) does (numpy data becomes a tensor first)."""
        return type(self)(_as_tensor(self.data).to(*args, **kwargs), self.orig_shape)

    def __repr__(self) -> str:
        kind = "numpy" if isinstance(self.data, np.ndarray) else f"torch {self.data.dtype}"
        return f"{type(self).__name__}(shape={self.shape}, {kind}, orig_shape={self.orig_shape})"


class Boxes(_Data):
    """(n, 6) [x1, y1, x2, y2, conf, cls] detections in original-image pixels, or (n, 7) [x1, y1, x2, y2, track_id, conf,
    cls] when tracked (ultralytics' layout)."""

    def __init__(self, data: Array, orig_shape: tuple[int, int]) -> None:
        if not isinstance(data, (torch.Tensor, np.ndarray)):
            data = torch.as_tensor(data, dtype=torch.float32)
        if data.ndim == 1:  # one row from an integer index, or an empty 1-D result
            data = data.reshape(0, 6) if data.shape[0] == 0 else data[None]
        if data.ndim != 2 or data.shape[1] not in (6, 7):
            raise ValueError(f"Boxes: expected (n, 6) [x1, y1, x2, y2, conf, cls] or (n, 7) with a track id, got shape {tuple(data.shape)}")
        super().__init__(data, orig_shape)

    @property
    def is_track(self) -> bool:
        """Whether the rows carry track ids."""
        return self.data.shape[1] == 7

    @property
    def xyxy(self) -> Array:
        """(n, 4) corners in pixels."""
        return self.data[:, :4]

    @property
    def conf(self) -> Array:
        """(n,) confidences."""
        return self.data[:, -2]

    @property
    def cls(self) -> Array:
        """(n,) class indices (as floats, like the data)."""
        return self.data[:, -1]

    @property
    def id(self) -> Array | None:
        """(n,) track ids, or None when not tracked."""
        return self.data[:, -3] if self.is_track else None

    @property
    def xywh(self) -> Array:
        """(n, 4) centre x, centre y, width, height in pixels."""
        xyxy = self.xyxy
        return xyxy2xywh(xyxy) if isinstance(xyxy, torch.Tensor) else xyxy2xywh(np.asarray(xyxy))

    @property
    def xyxyn(self) -> Array:
        """(n, 4) corners divided by the image width and height."""
        h, w = self.orig_shape
        return _divide(self.xyxy, (w, h, w, h))

    @property
    def xywhn(self) -> Array:
        """(n, 4) centre and size divided by the image width and height."""
        h, w = self.orig_shape
        return _divide(self.xywh, (w, h, w, h))


class Masks(_Data):
    """(n, H, W) boolean instance masks, normally at the original image size."""

    def __init__(self, data: Array, orig_shape: tuple[int, int]) -> None:
        if not isinstance(data, (torch.Tensor, np.ndarray)):
            data = torch.as_tensor(data, dtype=torch.bool)
        if data.ndim == 2:  # one mask from an integer index
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"Masks: expected (n, H, W) masks, got shape {tuple(data.shape)}")
        super().__init__(data, orig_shape)

    @property
    def xy(self) -> list[np.ndarray]:
        """One (k, 2) float32 outline per mask (its largest region) in original-image pixels; (0, 2) for an empty mask."""
        masks = _as_numpy(self.data)
        h, w = masks.shape[1:]
        scale = np.array([self.orig_shape[1] / w, self.orig_shape[0] / h], dtype=np.float32)
        return [mask_to_polygon(m > 0) * scale for m in masks]

    @property
    def xyn(self) -> list[np.ndarray]:
        """The outlines of xy divided by the image width and height."""
        gain = np.array([self.orig_shape[1], self.orig_shape[0]], dtype=np.float32)
        return [p / gain for p in self.xy]


class Results:
    """One image's predictions (boxes, optional masks), its image, path, class names and per-stage speed in ms."""

    def __init__(
        self, orig_img: np.ndarray, path: str | Path, names: Names | None, boxes: Boxes | Array | None = None,
        masks: Masks | Array | None = None, speed: Mapping[str, float | None] | None = None,
    ) -> None:
        if not isinstance(orig_img, np.ndarray) or orig_img.ndim not in (2, 3):
            raise ValueError(f"Results: orig_img must be an (H, W, 3) numpy image, got {type(orig_img).__name__}")
        self.orig_img = orig_img
        self.orig_shape: tuple[int, int] = (int(orig_img.shape[0]), int(orig_img.shape[1]))
        self.path = str(path)
        self.names = names_dict(names)
        self.boxes = boxes if isinstance(boxes, Boxes) or boxes is None else Boxes(_cpu(boxes), self.orig_shape)
        self.masks = masks if isinstance(masks, Masks) or masks is None else Masks(_cpu(masks), self.orig_shape)
        if self.boxes is not None and self.masks is not None and len(self.boxes) != len(self.masks):
            raise ValueError(f"Results: {len(self.boxes)} boxes but {len(self.masks)} masks")
        self.speed: dict[str, float | None] = dict(speed) if speed else {"preprocess": None, "inference": None, "postprocess": None}

    def _new(self, boxes: Boxes | None, masks: Masks | None) -> Results:
        """A Results for the same image, path, names and speed holding other boxes and masks."""
        return Results(self.orig_img, self.path, self.names, boxes, masks, self.speed)

    def __len__(self) -> int:
        """Number of detections."""
        for part in (self.boxes, self.masks):
            if part is not None:
                return len(part)
        return 0

    def __getitem__(self, idx: Any) -> Results:
        """The selected detections (index, slice, index list or boolean mask) as a new Results."""
        return self._new(None if self.boxes is None else self.boxes[idx], None if self.masks is None else self.masks[idx])

    def cpu(self) -> Results:
        """A Results whose boxes and masks are on the CPU."""
        return self._new(self.boxes and self.boxes.cpu(), self.masks and self.masks.cpu())

    def numpy(self) -> Results:
        """A Results whose boxes and masks are numpy copies."""
        return self._new(self.boxes and self.boxes.numpy(), self.masks and self.masks.numpy())

    def to(self, *args: Any, **kwargs: Any) -> Results:
        """A Results whose boxes and masks went through torch.Tensor.to(*args, **kwargs)."""
        return self._new(self.boxes and self.boxes.to(*args, **kwargs), self.masks and self.masks.to(*args, **kwargs))

    def _name(self, c: int) -> str:
        return self.names.get(c, str(c))

    def _det6(self) -> torch.Tensor:
        """(n, 6) float [x1, y1, x2, y2, conf, cls] on the CPU, the layout of detect.py's writers (track ids dropped)."""
        if self.boxes is None:
            return torch.zeros((0, 6))
        d = _as_tensor(self.boxes.data).detach().cpu().float()
        return torch.cat((d[:, :4], d[:, -2:]), 1)

    def _names_list(self, det: torch.Tensor) -> list[str]:
        """Names as a list long enough for every class in det (a missing name reads as its index)."""
        n = max([*self.names, *det[:, 5].int().tolist(), -1]) + 1
        return [self._name(i) for i in range(n)]

    def verbose(self) -> str:
        """Counts per class as ultralytics logs them: '2 circles, 1 square, ' ('(no detections), ' when empty)."""
        det = self._det6()
        return f"{describe(det, self._names_list(det))}, "

    def plot(
        self, conf: bool = True, labels: bool = True, boxes: bool = True, masks: bool = True, line_width: int | None = None,
        img: np.ndarray | None = None,
    ) -> np.ndarray:
        """An annotated BGR copy of the image (or of img): masks blended first, then boxes labelled with name, conf and,
        when tracked, 'id:N'."""
        out = np.ascontiguousarray(self.orig_img if img is None else img).copy()
        det = self._det6()
        if masks and self.masks is not None and len(self.masks):
            out = draw_masks(out, _as_numpy(self.masks.data), det[:, 5].int().tolist() or [0] * len(self.masks))
        if boxes and len(det):
            track = self.boxes.id if self.boxes is not None else None
            ids = None if track is None else [int(v) for v in _as_numpy(track)]
            out = draw_detections(out, det, self.names, line_width, hide_labels=not labels, hide_conf=not conf, ids=ids)
        return out

    def show(self, window: str | None = None) -> None:
        """Show plot() in an OpenCV window when this machine can, else log one warning line."""
        reason = no_display_reason()
        if not reason:
            try:
                cv2.imshow(window or self.path, self.plot())
                cv2.waitKey(1)
                return
            except cv2.error:
                reason = "this OpenCV build cannot open windows (headless)"
        LOGGER.warning(f"WARNING: Results.show(): {reason}; use save() instead")

    def save(self, filename: str | Path | None = None, **plot_kwargs: Any) -> str:
        """Write plot(**plot_kwargs) to filename (default results_<source name> in the working directory); never over the
        source image itself."""
        if filename is None:
            name = safe_component(Path(self.path).name, "image")
            filename = f"results_{name}" + ("" if Path(name).suffix else ".jpg")
        target, source = Path(filename), Path(self.path)
        same = resolve_path(target, ValueError, "Results.save") == resolve_path(source, ValueError, "Results.save", "source")
        if same or (target.exists() and source.exists() and os.path.samefile(target, source)):  # samefile: hard links
            raise ValueError(f"Results.save: {target} is the source image {self.path}; refusing to overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), self.plot(**plot_kwargs)):
            raise ValueError(f"Results.save: could not write {target} (unsupported extension or unwritable path)")
        return str(target)

    def save_txt(self, txt_file: str | Path, save_conf: bool = False) -> str:
        """Append the detections to txt_file as detect.py --save-txt does (YOLO boxes, or polygons when there are
        masks); nothing is written for no detections."""
        file, det = Path(txt_file), self._det6()
        if len(det) and self.masks is not None:
            write_polygon_labels(det, _as_numpy(self.masks.data), file, save_conf)
        elif len(det):
            write_labels(det, self.orig_shape, file, save_conf)
        return str(file)

    def save_crop(self, save_dir: str | Path, file_name: str | Path = "im.jpg") -> list[Path]:
        """Save each box's pixels as save_dir/<class>/<file_name stem>_<i>.jpg (as detect.py --save-crop)."""
        det = self._det6()
        return save_crops(det, self.orig_img, self._names_list(det), Path(save_dir), Path(file_name).stem)

    def summary(self, normalize: bool = False, decimals: int = 5) -> list[dict[str, Any]]:
        """One dict per detection with ultralytics' keys: name, class, confidence, box {x1, y1, x2, y2}, track_id when
        tracked, segments {x: [...], y: [...]} when there are masks; normalize divides by the image width and height."""
        if self.boxes is None:
            return []
        h, w = self.orig_shape if normalize else (1, 1)
        segments = None if self.masks is None else (self.masks.xyn if normalize else self.masks.xy)
        rows = []
        for i, row in enumerate(_as_tensor(self.boxes.data).detach().cpu().double().tolist()):
            c = int(row[-1])
            box = {k: round(v / g, decimals) for k, v, g in zip(BOX_KEYS, row[:4], (w, h, w, h))}
            item: dict[str, Any] = {"name": self._name(c), "class": c, "confidence": round(row[-2], decimals), "box": box}
            if self.boxes.is_track:
                item["track_id"] = int(row[-3])
            if segments is not None:
                pts = segments[i].astype(np.float64)
                item["segments"] = {"x": pts[:, 0].round(decimals).tolist(), "y": pts[:, 1].round(decimals).tolist()}
            rows.append(item)
        return rows

    def _summary_columns(self) -> list[str]:
        tracked = self.boxes is not None and self.boxes.is_track
        return ["name", "class", "confidence", "box"] + ["track_id"] * tracked + ["segments"] * (self.masks is not None)

    def to_json(self, normalize: bool = False, decimals: int = 5) -> str:
        """summary() as indented JSON text."""
        return json.dumps(self.summary(normalize, decimals), indent=2)

    tojson = to_json  # the ultralytics 8.0-8.2 name

    def to_df(self, normalize: bool = False, decimals: int = 5) -> Any:
        """summary() as a pandas DataFrame, one row per detection (columns kept when there are none)."""
        import pandas as pd

        return pd.DataFrame(self.summary(normalize, decimals), columns=self._summary_columns())

    def to_csv(self, normalize: bool = False, decimals: int = 5, **kwargs: Any) -> str:
        """to_df() as CSV text (no index column unless kwargs ask for one)."""
        return str(self.to_df(normalize, decimals).to_csv(**{"index": False, **kwargs}))

    def __repr__(self) -> str:
        extras = ", tracked" * bool(self.boxes is not None and self.boxes.is_track) + ", masks" * (self.masks is not None)
        return f"Results(path={self.path!r}, orig_shape={self.orig_shape}, {len(self)} detections: {self.verbose()[:-2]}{extras})"


def _cpu(x: Array) -> Array:
    """A tensor detached onto the CPU (numpy as is): Results hold CPU data only."""
    return x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)
