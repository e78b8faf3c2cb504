"""Serving backends: ONNX Runtime (CPU, always) and TensorRT (GPU, optional; imported lazily)."""
