"""Metrics: matching detections to labels, AP, confusion matrix, COCO scoring."""
