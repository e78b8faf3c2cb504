"""Kiln's KServe v2 gRPC gateway: A/B and sticky splits, pinning, shadow traffic, per-variant metrics.

Start one with ``server.gateway.app.start_gateway``; see ``server/gateway/README.md``.
"""
