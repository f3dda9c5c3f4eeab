"""Export: the format writers (ONNX, TorchScript, OpenVINO, NCNN, TFLite, Core ML) and INT8 quantization; utils/runtime/ runs the files."""
