"""The files of one published version that the runtime reads: artifact names per platform, manifest.

Triton's names: ``config.pbtxt`` ``platform`` values and their default ``default_model_filename``.
"""

from __future__ import annotations

ORT_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
DEFAULT_FILENAMES = {ORT_PLATFORM: "model.onnx", TENSORRT_PLATFORM: "model.plan"}
MANIFEST_NAME = "kiln.json"  # beside each version's artifact: how it was made (builders.manifest writes it)
