"""The runtime: one runner contract and its backends, used by validation and serving alike.

``runner``: the ``Runner`` protocol, ``RunnerSpec`` (threading included) and ``create_runner``.
``onnxruntime``: the CPU runner. ``tensorrt/``: TensorRT engine building and the TensorRT runner,
side by side; the only code in Kiln that imports ``tensorrt`` or ``polygraphy``'s
TensorRT parts, always inside functions. Depends on ``core`` only.
"""
