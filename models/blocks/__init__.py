"""Building blocks that yaml rows, backbones and heads share: the one Conv (conv), YOLOv5/YOLOv8 blocks (yolo),
RT-DETR's RepConv and RepC3 (repconv) and its transformer layers (transformer)."""
