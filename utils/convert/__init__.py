"""Import of official YOLOv5 / ultralytics YOLOv8 checkpoints as this project's checkpoints, without executing the file."""

from utils.convert.converter import convert_checkpoint, load_upstream
from utils.convert.mapping import ConversionError
from utils.convert.unpickler import UnsafeCheckpointError, read_torch_zip

__all__ = ["ConversionError", "UnsafeCheckpointError", "convert_checkpoint", "load_upstream", "read_torch_zip"]
