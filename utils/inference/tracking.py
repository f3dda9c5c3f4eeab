"""Track ids for a stream of Predictions (detect.py --track, the model object's track()): one ByteTracker per video or
stream, one across a sequence of still images, and MOTChallenge rows for each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import safe_component
from utils.inference.predictor import Prediction
from utils.tracking.byte_tracker import ByteTracker
from utils.tracking.mot import mot_lines, write_mot

TRACKERS = ("bytetrack",)


def check_tracker(name: str) -> str:
    """The tracker's name, or one ValueError line listing the known ones."""
    if name not in TRACKERS:
        raise ValueError(f"--tracker {name!r}: unknown tracker; known: {', '.join(TRACKERS)}")
    return name


class PredictionTracker:
    """Gives each Prediction its track ids, keeping only the detections a track took (their boxes unchanged).

    A new video or stream starts a new tracker (ids from 1 again); still images are one sequence, numbered 1, 2, ...
    as MOT frames. `fps` sets how long a lost track is kept (ByteTrack's buffer is in frames at 30 FPS)."""

    def __init__(self, tracker: str = "bytetrack", **options: Any) -> None:
        check_tracker(tracker)
        self.options = options
        self.key: object = object()
        self.tracker = ByteTracker(**options)
        self.sequence_frame = 0
        self.finished: list[tuple[str, dict[int, int]]] = []  # (source, unique tracks per class) of each sequence ended
        self.written: set[Path] = set()  # MOT files this tracker started (a rerun into the same folder starts them afresh)

    def _start(self, key: str, fps: float | None) -> None:
        if isinstance(self.key, str):
            self.finished.append((self.key, self.tracker.counts()))
        self.key, self.sequence_frame = key, 0
        options = dict(self.options)
        if fps:
            options.setdefault("frame_rate", round(fps))
        self.tracker = ByteTracker(**options)

    def __call__(self, pred: Prediction, fps: float | None = None) -> Prediction:
        """`pred` with the rows of its tracked detections and their ids."""
        key = "images" if pred.is_image else str(pred.path)
        if key != self.key:
            self._start(key, fps)
        self.sequence_frame += 1
        tracks = self.tracker.update(pred.det.numpy().astype(np.float32, copy=False))
        rows = torch.as_tensor(tracks[:, 7], dtype=torch.int64)
        return pred.select(rows, torch.as_tensor(tracks[:, 4], dtype=torch.int64))

    def mot_frame(self, pred: Prediction) -> int:
        """The MOT frame number of the prediction just tracked: the video's frame, else its place in the image sequence."""
        return pred.frame if not pred.is_image else self.sequence_frame

    def mot_rows(self, pred: Prediction) -> list[str]:
        """MOTChallenge rows (frame,id,x,y,w,h,conf,-1,-1,-1) of a tracked prediction."""
        assert pred.ids is not None, "mot_rows needs a tracked prediction"
        det = pred.det.numpy()
        rows = np.concatenate([det[:, :4], pred.ids.numpy()[:, None].astype(np.float32), det[:, 4:6]], 1)
        return mot_lines(self.mot_frame(pred), rows)

    def save_mot(self, save_dir: Path, pred: Prediction) -> Path:
        """Append a tracked prediction's MOT rows to tracks/<video stem>.txt (tracks/images.txt for still images)."""
        file = save_dir / "tracks" / f"{safe_component(pred.path.stem) if not pred.is_image else 'images'}.txt"
        if file not in self.written and file.is_file():
            file.unlink()  # left by an earlier run into the same folder (--exist-ok): this run's rows replace it
        write_mot(file, self.mot_rows(pred))
        self.written.add(file)
        return file

    def counts(self) -> list[tuple[str, dict[int, int]]]:
        """Unique tracks per class of every sequence so far, the current one last."""
        current = [(self.key, self.tracker.counts())] if isinstance(self.key, str) else []
        return self.finished + current
