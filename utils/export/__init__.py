"""Export and deployment: format writers, INT8 quantization, the one inference backend."""
