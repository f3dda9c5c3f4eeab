"""ByteTrack multi-object tracking: every detection box is associated, the low-confidence ones in a second pass.

Each frame: high-confidence detections are matched to the confirmed tracks and the recently lost ones (IoU with their
Kalman predictions), then low-confidence detections to the confirmed tracks still unmatched (a low score is often an
occluded object), then tracks born last frame to the high detections left. Tracks unmatched go lost and are dropped
after `track_buffer` frames (at 30 fps); high detections still unmatched start new tracks. A track gets its id when it
is confirmed (matched in two frames, or born in the first frame), so ids run 1, 2, 3 ... per tracker without gaps.
"""

from __future__ import annotations

from collections import Counter
from enum import IntEnum

import numpy as np

from utils.tracking.kalman import initiate, multi_predict, xyah_from_xyxy, xyxy_from_xyah
from utils.tracking.kalman import update as kalman_update
from utils.tracking.matching import fuse_score as fuse_score_fn
from utils.tracking.matching import iou_matrix, linear_assignment

LOW_MATCH_THRESH = 0.5  # IoU cost limit of the second (low-confidence) association
UNCONFIRMED_MATCH_THRESH = 0.7  # IoU cost limit of matching last frame's new tracks
DUPLICATE_THRESH = 0.15  # a tracked and a lost track closer than this IoU cost are one object


class TrackState(IntEnum):
    """Life cycle of a track."""

    NEW = 0
    TRACKED = 1
    LOST = 2
    REMOVED = 3


class Track:
    """One object's Kalman state and its latest detection (score, class, input row)."""

    def __init__(self, xyxy: np.ndarray, score: float, cls: int, det_index: int, frame: int) -> None:
        self.mean, self.cov = initiate(xyah_from_xyxy(xyxy)[0])
        self.score, self.cls, self.det_index = score, cls, det_index
        self.state = TrackState.NEW
        self.track_id = 0  # 0 until confirmed
        self.start_frame = self.frame = frame  # first and latest frame with a detection

    @property
    def confirmed(self) -> bool:
        """True once the track has an id."""
        return self.track_id > 0

    @property
    def xyxy(self) -> np.ndarray:
        """The filtered box [x1, y1, x2, y2]."""
        return xyxy_from_xyah(self.mean[:4])[0]

    def match(self, xyxy: np.ndarray, score: float, cls: int, det_index: int, frame: int) -> None:
        """Correct the state with this frame's detection and take its score, class and row."""
        self.mean, self.cov = kalman_update(self.mean, self.cov, xyah_from_xyxy(xyxy)[0])
        self.score, self.cls, self.det_index, self.frame = score, cls, det_index, frame
        self.state = TrackState.TRACKED


def _boxes(tracks: list[Track]) -> np.ndarray:
    """(n, 4) filtered boxes of tracks."""
    return np.array([t.xyxy for t in tracks]).reshape(-1, 4)


class ByteTracker:
    """ByteTrack over one video: feed `update` one frame's detections at a time, in order.

    Parameter names and defaults are ultralytics' bytetrack.yaml: track_high_thresh splits high from low detections,
    track_low_thresh drops detections below it, new_track_thresh is the confidence a new track needs, track_buffer the
    frames (at 30 fps) a lost track is kept, match_thresh the IoU cost limit of the first association, fuse_score
    weights IoU by detection confidence in the first and the unconfirmed association.
    """

    def __init__(self, track_high_thresh: float = 0.25, track_low_thresh: float = 0.1, new_track_thresh: float = 0.25,
                 track_buffer: int = 30, match_thresh: float = 0.8, fuse_score: bool = True, frame_rate: float = 30.0) -> None:  # fmt: skip
        self.track_high_thresh, self.track_low_thresh = track_high_thresh, track_low_thresh
        self.new_track_thresh, self.match_thresh, self.fuse_score = new_track_thresh, match_thresh, fuse_score
        self.track_buffer, self.frame_rate = track_buffer, frame_rate
        self.max_time_lost = int(frame_rate / 30.0 * track_buffer)
        self.reset()

    def reset(self) -> None:
        """Forget every track and restart ids at 1, for a new video."""
        self.frame_id = 0
        self.next_id = 1
        self.tracked: list[Track] = []  # matched last frame (confirmed or new)
        self.lost: list[Track] = []
        self.classes: dict[int, int] = {}  # confirmed id -> class of its latest detection

    def counts(self) -> dict[int, int]:
        """Unique confirmed track ids per class (each counted once, under the class of its latest detection)."""
        return dict(sorted(Counter(self.classes.values()).items()))

    def _associate(self, tracks: list[Track], dets: np.ndarray, idx: np.ndarray, thresh: float,
                   fuse: bool) -> tuple[list[Track], np.ndarray]:  # fmt: skip
        """Match tracks to the detections dets[idx] and update the matched ones; returns (unmatched tracks, unmatched
        detection rows)."""
        cost = 1.0 - iou_matrix(_boxes(tracks), dets[idx, :4])
        if fuse:
            cost = fuse_score_fn(cost, dets[idx, 4])
        matches, u_track, u_det = linear_assignment(cost, thresh)
        for ti, di in matches:
            row = int(idx[di])
            tracks[ti].match(dets[row, :4], float(dets[row, 4]), int(dets[row, 5]), row, self.frame_id)
        return [tracks[i] for i in u_track], idx[u_det]

    def _confirm(self, track: Track) -> None:
        """Give a track its id (the next one) if it has none yet."""
        if not track.confirmed:
            track.track_id, self.next_id = self.next_id, self.next_id + 1

    def _predict(self, tracks: list[Track]) -> None:
        """One Kalman prediction step for all tracks; a lost track keeps its height (no height velocity)."""
        if not tracks:
            return
        means = np.array([t.mean for t in tracks])
        means[[t.state != TrackState.TRACKED for t in tracks], 7] = 0.0
        means, covs = multi_predict(means, np.array([t.cov for t in tracks]))
        for t, m, c in zip(tracks, means, covs):
            t.mean, t.cov = m, c

    def update(self, dets: np.ndarray) -> np.ndarray:
        """Track one frame: dets (n, 6) [x1, y1, x2, y2, conf, cls] in pixels (n may be 0).

        Returns (m, 8) [x1, y1, x2, y2, track_id, conf, cls, det_index] for the confirmed tracks matched in this frame:
        the Kalman-filtered box, the matched detection's confidence and class, and its row in dets."""
        self.frame_id += 1
        dets = np.asarray(dets, np.float64)
        if dets.size == 0:
            dets = np.zeros((0, 6))
        elif dets.ndim != 2 or dets.shape[1] != 6:
            raise ValueError(f"ByteTracker.update: detections must be (n, 6) [x1, y1, x2, y2, conf, cls], got {dets.shape}")
        scores = dets[:, 4]
        high = np.flatnonzero(scores >= self.track_high_thresh)
        low = np.flatnonzero((scores > self.track_low_thresh) & (scores < self.track_high_thresh))
        unconfirmed = [t for t in self.tracked if not t.confirmed]
        pool = [t for t in self.tracked if t.confirmed] + self.lost
        self._predict(pool + unconfirmed)

        left, high_left = self._associate(pool, dets, high, self.match_thresh, self.fuse_score)
        still_tracked = [t for t in left if t.state == TrackState.TRACKED]
        unmatched, _ = self._associate(still_tracked, dets, low, LOW_MATCH_THRESH, False)
        for t in unmatched:
            t.state = TrackState.LOST
        stale, high_left = self._associate(unconfirmed, dets, high_left, UNCONFIRMED_MATCH_THRESH, self.fuse_score)
        for t in stale:
            t.state = TrackState.REMOVED
        born = [Track(dets[i, :4], float(dets[i, 4]), int(dets[i, 5]), int(i), self.frame_id)
                for i in high_left if dets[i, 4] >= self.new_track_thresh]  # fmt: skip
        if self.frame_id == 1:
            for t in born:
                t.state = TrackState.TRACKED
        for t in pool + unconfirmed + born:
            if t.state == TrackState.LOST and self.frame_id - t.frame > self.max_time_lost:
                t.state = TrackState.REMOVED
            if t.state == TrackState.TRACKED:
                self._confirm(t)
                self.classes[t.track_id] = t.cls
        self.tracked = [t for t in pool + unconfirmed if t.state == TrackState.TRACKED] + born
        self.lost = [t for t in pool if t.state == TrackState.LOST]
        self._drop_duplicates()
        out = [t for t in self.tracked if t.confirmed]
        return np.array([[*t.xyxy, t.track_id, t.score, t.cls, t.det_index] for t in out], np.float64).reshape(-1, 8)

    def _drop_duplicates(self) -> None:
        """A lost track overlapping a tracked one is the same object: keep the one that has lived longer."""
        if not self.tracked or not self.lost:
            return
        close = np.argwhere(1.0 - iou_matrix(_boxes(self.tracked), _boxes(self.lost)) < DUPLICATE_THRESH)
        drop_tracked, drop_lost = set(), set()
        for ti, li in close:
            t, lo = self.tracked[ti], self.lost[li]
            if t.frame - t.start_frame > lo.frame - lo.start_frame:
                drop_lost.add(int(li))
            else:
                drop_tracked.add(int(ti))
        self.tracked = [t for i, t in enumerate(self.tracked) if i not in drop_tracked]
        self.lost = [t for i, t in enumerate(self.lost) if i not in drop_lost]
