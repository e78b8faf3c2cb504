"""Kiln server: the embedded KServe v2 server, the gateway, rollouts, bench and the CLI.

Importing this package never imports TensorRT or Polygraphy's TensorRT backend.
"""

__version__ = "0.1.0"
