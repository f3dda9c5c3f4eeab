"""Detection models. Importing the package registers the built-in yaml modules and heads, in one explicit list:
YOLOv5/YOLOv8 blocks (common), the backbones (mobilenetv4, mobileone), YOLOv5's Detect head (yolo), its Segment
head (segment, which imports yolo) and the anchor-free head (anchor_free)."""

from models import anchor_free, common, mobilenetv4, mobileone, segment, yolo  # noqa: F401  (each registers its modules by name)
