"""Kiln builders: ONNX in, verified engines out, published to a Triton model repository.

Importing this package never imports TensorRT, Polygraphy or torch.
"""

__version__ = "0.1.0"
