"""Heads: the contract and head registry (base), YOLOv5's Detect (detect) and Segment (segment), YOLOv8's anchor-free
head (anchor_free, with its point geometry in anchor_points), RT-DETR's decoder (rtdetr, with denoising and
rtdetr_output) and the Classify head (classify). Each module registers its head when imported."""
