"""Envoy as the gateway's data plane, Kiln as its control plane (see ``server/gateway/README.md``)."""
