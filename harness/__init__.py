"""Test and benchmark support, outside the installed packages.

``models``: tiny real ONNX models; ``serve``/``gateway``/``rollout``: servers and fixtures on
127.0.0.1; ``serve_bench``/``gateway_bench``/``gateway_roles``/``grpc_echo``: benchmark processes
and floors; ``triton/``: a real Triton 2.51 (nvidia-pytriton wheel) installer and harness.
"""
