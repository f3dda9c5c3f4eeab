"""Inference runtime: DetectBackend (backend.py) and the runners of the exported formats it opens (ONNX Runtime and
TorchScript inline; OpenVINO, NCNN, TFLite in their own modules; Core ML metadata and availability in coreml.py).

The exporter (utils/export/) writes these formats and may use this package to check its files; nothing here imports it.
"""
