"""Detection models. Importing the package registers the built-in yaml modules and heads, in one explicit list:
YOLOv5/YOLOv8 blocks (common), RT-DETR's RepConv and RepC3 (repconv) and AIFI (transformer), the backbones
(mobilenetv4, mobileone), YOLOv5's Detect head (yolo), its Segment head (segment, which imports yolo), the anchor-free
head (anchor_free), RT-DETR's decoder (rtdetr) and the classification head (classify, which imports yolo)."""

from models import (  # noqa: F401  (each registers its modules by name)
    anchor_free,
    classify,
    common,
    mobilenetv4,
    mobileone,
    repconv,
    rtdetr,
    segment,
    transformer,
    yolo,
)
