#!/usr/bin/env bash
# GPU figures of issue 28 part 2 (AMP vs float32 training, fp16 PyTorch/ONNX Runtime inference, TensorRT, -m gpu tests): scripts/gpu_report.py
exec python3 "$(dirname "$0")/gpu_report.py" --out "${OUT:-runs/gpu_report}" "$@"
