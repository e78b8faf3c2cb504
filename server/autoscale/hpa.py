"""HorizontalPodAutoscaler manifests (autoscaling/v2) from a recorded capacity.

Pure rendering: dicts in Kubernetes' own schema, turned into YAML at the edge. Triton scales on a
per-pod Prometheus metric served to the HPA by the Prometheus adapter (the rules are
``ADAPTER_RULES``, also in ``deploy/k8s/prometheus-adapter.yaml``); the gateway scales on CPU.

Two metrics, both derived from counters every Triton exports on its metrics port:

* ``kiln_triton_requests_per_second``: ``rate(nv_inference_request_success[1m])`` per pod; its
  target is the open-loop capacity (requests/s at the SLO) times the headroom;
* ``kiln_triton_in_flight``: ``rate(nv_inference_request_duration_us[1m]) / 1e6`` per pod, the
  average number of requests inside the server (Little's law: summed request time per second);
  its target is the closed-loop capacity (requests in flight at the SLO) times the headroom.

The scaling behaviour is written out in full (Kubernetes' defaults, made explicit) so that
``benchmarks/sim_autoscale.py`` replays exactly what is deployed (``policy_from_hpa``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidInputError, NotFoundError
from server.autoscale.simulate import HpaPolicy

METRICS: dict[str, str] = {"rate": "kiln_triton_requests_per_second", "concurrency": "kiln_triton_in_flight"}
UNITS: dict[str, str] = {"rate": "requests/s", "concurrency": "requests in flight"}

ADAPTER_RULES: dict[str, Any] = {
    "rules": [
        {
            "seriesQuery": 'nv_inference_request_success{namespace!="",pod!=""}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": "^nv_inference_request_success$", "as": METRICS["rate"]},
            "metricsQuery": "sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)",
        },
        {
            "seriesQuery": 'nv_inference_request_duration_us{namespace!="",pod!=""}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": "^nv_inference_request_duration_us$", "as": METRICS["concurrency"]},
            "metricsQuery": "sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>) / 1e6",
        },
    ]
}


@dataclass(frozen=True)
class AutoscaleSpec:
    """What to scale, on which recorded capacity, with how much headroom."""

    model: str
    mode: str  # which capacity: "rate" (requests/s) or "concurrency" (requests in flight)
    capacity: float  # per replica, at the SLO
    headroom: float = 0.7  # target = capacity * headroom
    min_replicas: int = 1
    max_replicas: int = 10
    namespace: str = "default"
    triton_deployment: str = "triton"
    gateway_deployment: str = "kiln-gateway"
    gateway_cpu_percent: int = 70
    gateway_min_replicas: int = 2
    gateway_max_replicas: int = 10
    scale_down_window_s: int = 300

    def check(self) -> None:
        if self.mode not in METRICS:
            raise InvalidInputError(f"--metric must be one of {sorted(METRICS)}, got {self.mode!r}")
        if not math.isfinite(self.capacity) or self.capacity <= 0:
            raise InvalidInputError(f"the recorded capacity must be > 0, got {self.capacity}")
        if not 0 < self.headroom <= 1:
            raise InvalidInputError(
                f"--headroom must be in (0, 1] (the share of the measured capacity to run at), got {self.headroom}"
            )
        for low, high, what in (
            (self.min_replicas, self.max_replicas, "--min-replicas/--max-replicas"),
            (self.gateway_min_replicas, self.gateway_max_replicas, "gateway min/max replicas"),
        ):
            if not 1 <= low <= high:
                raise InvalidInputError(f"{what} need 1 <= min <= max, got {low} and {high}")
        if not 1 <= self.gateway_cpu_percent <= 100:
            raise InvalidInputError(f"--gateway-cpu must be 1..100 (percent), got {self.gateway_cpu_percent}")

    @property
    def target(self) -> float:
        return self.capacity * self.headroom


def quantity(value: float) -> str:
    """A Kubernetes quantity: whole numbers plain, otherwise in thousandths (``"12500m"``)."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def behavior(scale_down_window_s: int = 300) -> dict[str, Any]:
    """Kubernetes' default scaling behaviour, written out."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 4, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": scale_down_window_s,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
        },
    }


def triton_hpa(spec: AutoscaleSpec) -> dict[str, Any]:
    """The HPA scaling the Triton Deployment on the model's per-pod metric."""
    spec.check()
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": f"{spec.triton_deployment}-{spec.model}"[:253].lower(),
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "kiln"},
            "annotations": {
                "kiln.dev/capacity": f"{spec.capacity:g} {UNITS[spec.mode]} per replica",
                "kiln.dev/headroom": f"{spec.headroom:g}",
            },
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.triton_deployment},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": METRICS[spec.mode], "selector": {"matchLabels": {"model": spec.model}}},
                        "target": {"type": "AverageValue", "averageValue": quantity(spec.target)},
                    },
                }
            ],
            "behavior": behavior(spec.scale_down_window_s),
        },
    }


def gateway_hpa(spec: AutoscaleSpec) -> dict[str, Any]:
    """The HPA scaling the gateway on CPU (its pods request CPU, see deploy/k8s/gateway.yaml)."""
    spec.check()
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": spec.gateway_deployment,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "kiln"},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.gateway_deployment},
            "minReplicas": spec.gateway_min_replicas,
            "maxReplicas": spec.gateway_max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": spec.gateway_cpu_percent},
                    },
                }
            ],
            "behavior": behavior(spec.scale_down_window_s),
        },
    }


def policy_from_hpa(hpa: dict[str, Any], *, startup_s: float = 60.0) -> HpaPolicy:
    """The simulator's policy for a rendered Triton HPA (a Pods metric with an AverageValue target)."""
    spec = hpa["spec"]
    target = spec["metrics"][0]["pods"]["target"]["averageValue"]
    up = spec["behavior"]["scaleUp"]["policies"]
    down = spec["behavior"]["scaleDown"]
    return HpaPolicy(
        target_per_pod=parse_quantity(str(target)),
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec["maxReplicas"]),
        scale_down_window_s=float(down["stabilizationWindowSeconds"]),
        scale_up_percent=float(next(p["value"] for p in up if p["type"] == "Percent")),
        scale_up_pods=int(next(p["value"] for p in up if p["type"] == "Pods")),
        scale_down_percent=float(next(p["value"] for p in down["policies"] if p["type"] == "Percent")),
        startup_s=startup_s,
    )


def parse_quantity(text: str) -> float:
    """``"12500m"`` -> 12.5, ``"70"`` -> 70.0 (the forms ``quantity`` writes)."""
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError as err:
        raise InvalidInputError(f"quantity {text!r} is not a number or NNNm (thousandths)") from err


def pick_capacity(entries: list[dict[str, Any]], mode: str, slo_p99_ms: float | None, where: str) -> dict[str, Any]:
    """The recorded capacity entry to scale on: the given mode (and SLO, if named), newest first."""
    usable = [e for e in entries if e.get("mode") == mode and e.get("capacity")]
    if slo_p99_ms is not None:
        usable = [e for e in usable if float(e.get("slo", {}).get("p99_ms", -1)) == slo_p99_ms]
    if not usable:
        recorded = [f"{e.get('mode')} at p99 {e.get('slo', {}).get('p99_ms')} ms" for e in entries] or ["nothing"]
        slo = f" at p99 {slo_p99_ms:g} ms" if slo_p99_ms is not None else ""
        flag = "--find-capacity" if mode == "rate" else "--find-capacity --capacity-mode concurrency"
        raise NotFoundError(
            f"{where} has no recorded {mode} capacity{slo} (recorded: {', '.join(recorded)}); "
            f"run `kiln bench {flag} --slo-p99-ms X --record` against it first"
        )
    return max(usable, key=lambda e: str(e.get("measured", "")))
