"""TensorRT plans: the only builder package that imports ``tensorrt`` (inside functions only).

``build.build_tensorrt`` is the ``kiln build --target tensorrt`` branch of the pipeline;
``engine.build_engine`` turns one prepared ONNX file into one ``model.plan``.
"""
