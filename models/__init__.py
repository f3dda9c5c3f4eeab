"""Detection models. Importing the package registers the built-in yaml modules, in one explicit list:
YOLOv5 blocks (common), the backbones (mobilenetv4, mobileone) and the Detect head (yolo)."""

from models import common, mobilenetv4, mobileone, yolo  # noqa: F401  (each registers its modules by name)
