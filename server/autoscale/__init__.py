"""Autoscaling from measured capacity: HPA manifests (``hpa``) and a replay of the HPA algorithm (``simulate``)."""
