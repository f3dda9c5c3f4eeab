"""Multi-object tracking: ByteTrack over per-frame detections, its Kalman filter and matching, MOTChallenge files and metrics."""

from utils.tracking.byte_tracker import ByteTracker
from utils.tracking.mot import mot_lines, mot_metrics, read_mot, write_mot

__all__ = ["ByteTracker", "mot_lines", "mot_metrics", "read_mot", "write_mot"]
