"""HPA manifests from a recorded capacity, the deploy/k8s autoscaling files, and the HPA replay."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import yaml

from core.errors import InvalidInputError, NotFoundError
from server.autoscale.hpa import (
    ADAPTER_RULES,
    METRICS,
    AutoscaleSpec,
    gateway_hpa,
    parse_quantity,
    pick_capacity,
    policy_from_hpa,
    quantity,
    triton_hpa,
)
from server.autoscale.simulate import HpaPolicy, diurnal_trace, replay

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_every_manifest_in_deploy_k8s_validates_strictly() -> None:
    seen = 0
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path.name):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            seen += 1
    assert seen >= 15


def test_rendered_hpas_validate_and_carry_the_target() -> None:
    spec = AutoscaleSpec(model="digits-int8-ort", mode="rate", capacity=250.0, headroom=0.7, max_replicas=12)
    triton, gateway = triton_hpa(spec), gateway_hpa(spec)
    for doc in (triton, gateway):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    metric = triton["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == METRICS["rate"]
    assert metric["metric"]["selector"] == {"matchLabels": {"model": "digits-int8-ort"}}
    assert metric["target"] == {"type": "AverageValue", "averageValue": "175"}
    assert triton["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert gateway["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    concurrency = triton_hpa(AutoscaleSpec(model="m", mode="concurrency", capacity=7, headroom=0.5))
    assert concurrency["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kiln_triton_in_flight"
    assert concurrency["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "3500m"


def test_invalid_yaml_is_caught_by_the_validator() -> None:
    broken = triton_hpa(AutoscaleSpec(model="m", mode="rate", capacity=10))
    broken["spec"]["maxReplicas"] = "many"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_checked_in_autoscaling_yaml_is_what_the_renderer_prints() -> None:
    triton, gateway = documents("autoscaling.yaml")
    capacity = float(triton["metadata"]["annotations"]["kiln.dev/capacity"].split()[0])
    headroom = float(triton["metadata"]["annotations"]["kiln.dev/headroom"])
    model = triton["spec"]["metrics"][0]["pods"]["metric"]["selector"]["matchLabels"]["model"]
    spec = AutoscaleSpec(
        model=model, mode="rate", capacity=capacity, headroom=headroom, max_replicas=triton["spec"]["maxReplicas"]
    )
    assert triton == triton_hpa(spec) and gateway == gateway_hpa(spec)
    deployments = {
        d["metadata"]["name"]
        for name in ("triton.yaml", "gateway.yaml")
        for d in documents(name)
        if d["kind"] == "Deployment"
    }
    assert {triton["spec"]["scaleTargetRef"]["name"], gateway["spec"]["scaleTargetRef"]["name"]} <= deployments


def test_adapter_rules_serve_the_metrics_the_hpa_reads_from_scraped_series() -> None:
    [config_map] = documents("prometheus-adapter.yaml")
    rules = yaml.safe_load(config_map["data"]["config.yaml"])
    assert rules == ADAPTER_RULES
    assert {r["name"]["as"] for r in rules["rules"]} == set(METRICS.values())
    for rule in rules["rules"]:
        assert all(part in rule["metricsQuery"] for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"))
        assert rule["name"]["matches"].strip("^$") in rule["seriesQuery"]
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    prometheus = yaml.safe_load(documents("prometheus.yaml")[0]["data"]["prometheus.yml"])
    triton_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "triton")
    labels = {r.get("target_label") for r in triton_job["relabel_configs"]}
    assert {"namespace", "pod"} <= labels  # the labels the adapter's overrides map to resources


def test_quantities_round_trip() -> None:
    for value in (1400.0, 12.5, 0.25, 3.0):
        assert parse_quantity(quantity(value)) == pytest.approx(value)
    assert quantity(12.5) == "12500m" and quantity(70) == "70"
    with pytest.raises(InvalidInputError, match="'lots'"):
        parse_quantity("lots")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (AutoscaleSpec(model="m", mode="rate", capacity=10, headroom=0), r"--headroom must be in \(0, 1\].*got 0"),
        (AutoscaleSpec(model="m", mode="rate", capacity=10, headroom=1.5), "got 1.5"),
        (AutoscaleSpec(model="m", mode="rate", capacity=0), "capacity must be > 0, got 0"),
        (AutoscaleSpec(model="m", mode="rate", capacity=10, min_replicas=5, max_replicas=2), "got 5 and 2"),
        (AutoscaleSpec(model="m", mode="latency", capacity=10), "--metric must be one of"),
    ],
)
def test_bad_autoscale_settings_say_what_is_wrong(spec: AutoscaleSpec, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        triton_hpa(spec)


def test_pick_capacity_takes_the_newest_of_the_mode_and_slo() -> None:
    entries = [
        {"mode": "rate", "capacity": 100, "slo": {"p99_ms": 50}, "measured": "2026-01-01T00:00:00"},
        {"mode": "rate", "capacity": 120, "slo": {"p99_ms": 50}, "measured": "2026-02-01T00:00:00"},
        {"mode": "rate", "capacity": 300, "slo": {"p99_ms": 200}, "measured": "2026-03-01T00:00:00"},
        {"mode": "concurrency", "capacity": 8, "slo": {"p99_ms": 50}, "measured": "2026-03-01T00:00:00"},
    ]
    assert pick_capacity(entries, "rate", 50.0, "m v1")["capacity"] == 120
    assert pick_capacity(entries, "rate", None, "m v1")["capacity"] == 300
    assert pick_capacity(entries, "concurrency", None, "m v1")["capacity"] == 8
    with pytest.raises(NotFoundError, match=r"m v1 has no recorded rate capacity at p99 10 ms .*--record"):
        pick_capacity(entries, "rate", 10.0, "m v1")


# ---------------------------------------------------------------- the HPA replay


def policy(**overrides: Any) -> HpaPolicy:
    return HpaPolicy(**{"target_per_pod": 100.0, "max_replicas": 50, "startup_s": 0.0, **overrides})


def steady(rate: float, seconds: float = 600, step: float = 15) -> tuple[np.ndarray, np.ndarray]:
    times = np.arange(0, seconds, step)
    return times, np.full(times.size, rate)


def test_steady_load_settles_at_ceil_of_load_over_target() -> None:
    times, rates = steady(1000.0)
    result = replay(times, rates, 150.0, policy())
    assert result.replicas[-1] == 10 and not result.breached.any()


def test_within_tolerance_nothing_changes() -> None:
    times, rates = steady(1080.0)  # 10 pods at 108 per pod: 8 % over target, inside the 10 % tolerance
    result = replay(times, rates, 150.0, policy(), initial=10)
    assert set(result.replicas.tolist()) == {10}
    outside = replay(times, np.full(times.size, 1120.0), 150.0, policy(), initial=10)
    assert outside.replicas[-1] == 12  # 12 % over: ceil(10 * 1.12)


def test_scale_up_is_limited_by_its_policies_per_period() -> None:
    times = np.arange(0, 300, 15.0)
    rates = np.where(times < 15, 100.0, 10000.0)
    result = replay(times, rates, 150.0, policy(metric_window_s=15))
    # from 1 pod: +max(100 %, 4 pods) per 15 s period -> 5, 10, 20, 40, then the 100 wanted (capped at 50)
    assert result.replicas[:6].tolist() == [1, 5, 10, 20, 40, 50]


def test_scale_down_waits_for_the_stabilization_window() -> None:
    times = np.arange(0, 900, 15.0)
    rates = np.where(times < 300, 1000.0, 100.0)
    result = replay(times, rates, 150.0, policy(metric_window_s=15))
    high = result.replicas[times < 300].max()
    drop = times[np.argmax((times >= 300) & (result.replicas < high))]
    assert high == 10 and 300 + 300 <= drop <= 300 + 300 + 15  # not before the 300 s window has passed
    assert result.replicas[-1] == 1


def test_pods_serve_only_after_startup_so_a_burst_breaches_until_then() -> None:
    times = np.arange(0, 600, 15.0)
    rates = np.where(times < 300, 100.0, 400.0)
    result = replay(times, rates, 150.0, policy(startup_s=60.0, metric_window_s=15))
    breached_s = result.breached.sum() * 15
    assert 45 <= breached_s <= 90 and not result.breached[times >= 400].any()


def test_policy_from_the_rendered_hpa_is_the_one_replayed() -> None:
    hpa = triton_hpa(AutoscaleSpec(model="m", mode="rate", capacity=200.0, headroom=0.75, max_replicas=9))
    replayed = policy_from_hpa(hpa, startup_s=30)
    assert (replayed.target_per_pod, replayed.max_replicas, replayed.scale_down_window_s) == (150.0, 9, 300.0)
    assert (replayed.scale_up_percent, replayed.scale_up_pods, replayed.startup_s) == (100.0, 4, 30)


def test_a_day_with_a_burst_meets_the_issue_goals_at_headroom_07() -> None:
    capacity = 100.0
    spec = AutoscaleSpec(model="m", mode="rate", capacity=capacity, headroom=0.7, max_replicas=40)
    times, rates = diurnal_trace(16 * capacity)
    result = replay(times, rates, capacity, policy_from_hpa(triton_hpa(spec)))
    assert result.slo_met_share >= 0.99
    assert result.replica_hours <= 0.70 * result.fixed_replica_hours
    assert result.fixed_replicas == math.ceil(rates.max() / capacity)


def test_bad_traces_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="capacity must be > 0"):
        replay([0, 15], [1, 1], 0.0, policy())
    with pytest.raises(InvalidInputError, match="got 3/2"):
        replay([0, 15, 30], [1, 1], 10.0, policy())
    with pytest.raises(InvalidInputError, match=r"min replicas \(3\) <= max replicas \(2\)"):
        replay([0, 15], [1, 1], 10.0, policy(min_replicas=3, max_replicas=2))
