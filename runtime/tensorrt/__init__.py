"""TensorRT, build and run side by side (Polygraphy's layout): ``engine`` turns one prepared ONNX
file into a serialized plan, ``runner`` executes plans. ``tensorrt``/``polygraphy`` are
imported inside functions only, so importing this package works on any machine.
"""
