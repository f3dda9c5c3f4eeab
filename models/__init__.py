"""Detection models. Importing the package registers the built-in yaml modules and heads, in one explicit list:
the blocks (models/blocks: Conv, YOLOv5/YOLOv8 blocks, RT-DETR's RepConv/RepC3 and AIFI), the backbones
(mobilenetv4, mobileone) and the heads (models/heads: Detect, Segment, anchor-free, RT-DETR, Classify)."""

from models import mobilenetv4, mobileone  # noqa: F401  (each registers its modules by name)
from models.blocks import conv, repconv, transformer, yolo  # noqa: F401
from models.heads import anchor_free, classify, detect, end2end, rtdetr, segment  # noqa: F401
