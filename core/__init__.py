"""Kiln's shared kernel, imported by every other layer and importing none of them.

``errors``: the one domain error hierarchy (mapped to gRPC codes in ``server/status.py`` and to
exit codes in ``server/cli``). ``atomic_file``: replace a file atomically and durably.
"""
