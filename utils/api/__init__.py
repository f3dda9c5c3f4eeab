"""The ultralytics-style Python front door: `from utils.api import YOLO`."""

from utils.api.model import YOLO, Metrics

__all__ = ["YOLO", "Metrics"]
