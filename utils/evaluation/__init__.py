"""Evaluation: metrics (matching, AP, confusion), the DetectionEvaluator, the validation loop, figures and COCO scoring."""
