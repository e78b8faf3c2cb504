"""Token streams through the gateway, and rollouts judged on TTFT and on greedy token agreement:
a real embedded server with tiny decoders, a real gateway with the rollout plugin, real stream clients."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.llm import PREFILL_DELAY_S, StreamLoad, build_llm_repository, serve_llm_child
from server.app import start_server
from server.bench.stream import StreamBenchConfig, run_stream_bench
from server.gateway.app import GatewayHandle, start_gateway
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.timeline import run_rollout

pytestmark = pytest.mark.integration
PLUGINS = ("server.rollout.plugin",)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llm_repository(tmp_path_factory.mktemp("llm-rollout"))


@pytest.fixture(scope="module")
def upstream(repo: Path) -> Iterator[str]:
    with start_server(repo, port=0) as server:
        yield server.url


def start(upstream_url: str, mode: str = "threads") -> GatewayHandle:
    config = {
        "upstreams": {"local": {"address": upstream_url}},
        "routes": {
            "llm": {"variants": [{"name": "base", "upstream": "local", "model": "tiny-fp32-ort", "weight": 100}]}
        },
        "metrics": {"window_s": 30},
        "server": {"mode": mode},
    }
    return start_gateway(config, port=0, admin_port=0, insecure_admin=True, plugins=PLUGINS)


def plan(
    model: str, *, ttft_ratio: float = 10.0, min_requests: int = 16, comparisons: int = 8, steps: tuple = (50,)
) -> RolloutPlan:
    """A shadow phase, then one 50 % step. TTFT is judged loosely unless ``ttft_ratio`` says otherwise:
    a p99 of a few dozen requests on a busy 2-core box has tails of ~0.15 s (the TTFT test sizes for it)."""
    return plan_from_mapping({
        "route": "llm", "baseline": "base",
        "candidate": {"name": "cand", "upstream": "local", "model": model},
        "steps": list(steps), "interval_s": 1.5, "min_requests": min_requests, "max_wait_s": 40, "sample_percent": 0,
        "shadow": {"duration_s": 0.5, "percent": 50, "min_comparisons": comparisons},
        "slos": {"max_error_rate": 0.05, "max_p99_ratio": 10.0, "max_ttft_p99_ratio": ttft_ratio,
                 "min_token_agreement": 0.95},  # no ITL ratio: sub-ms tiny-model ITL p99s are scheduling noise
    })  # fmt: skip


def _story(run: Any) -> list[tuple[str, str]]:
    return [(e["kind"], e["message"]) for e in run.events]


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_streams_pass_the_gateway_with_ttft_and_itl_per_variant(upstream: str, mode: str) -> None:
    with start(upstream, mode) as gw:
        config = StreamBenchConfig(url=gw.address, model="llm", max_tokens=6, requests=6, warmup_requests=0)
        result = run_stream_bench(config)
        point = result.points[0]
        assert point.ok == 6 and not point.errors and set(point.variants) == {"base"}
        assert gw.streams is not None
        window = gw.streams.window("llm", "base", None)
        assert window is not None and window.requests == 6 and window.tokens == 36
        assert window.ttft.p50_ms > 0 and window.itl.count == 6
        assert gw.metrics.window("llm", "base").requests == 6  # a stream request counts as a request
        with urllib.request.urlopen(f"http://{gw.admin_host}:{gw.admin_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'kiln_gateway_ttft_seconds_count{route="llm",variant="base"} 6.0' in text
        assert 'kiln_gateway_itl_seconds_count{route="llm",variant="base"} 6.0' in text


def test_byte_identical_candidate_is_promoted(upstream: str) -> None:
    with start(upstream) as gw, StreamLoad(gw.address, "llm", threads=2) as load:
        run = run_rollout(gw, plan("same-fp32-ort"), timeout_s=40)
        load.stop()
    assert run.outcome == "promoted", _story(run)
    shadow_passed = next(e for e in run.events if e["kind"] == "step")
    assert shadow_passed["figures"]["token_agreement"] == 1.0 and shadow_passed["figures"]["compared"] >= 8
    assert [v.model for v in gw.routes.route("llm").variants] == ["same-fp32-ort"]
    assert not load.result.errors


@pytest.mark.slow
def test_candidate_with_a_slower_first_token_is_rolled_back_on_ttft(repo: Path) -> None:
    """Every prompt step takes 0.7 s (1.05 s for slowfirst-*: 50 % more); the server runs in its own
    process, so the ratio is 1.5 give or take the box's tails, against a limit of 1.25; two steps, so
    one window where the baseline drew a long tail cannot let the candidate through."""
    with (
        serve_llm_child(repo, PREFILL_DELAY_S) as url,
        start(url) as gw,
        StreamLoad(gw.address, "llm", threads=4) as load,
    ):
        slow = plan("slowfirst-fp32-ort", ttft_ratio=1.25, min_requests=6, comparisons=4, steps=(40, 60))
        run = run_rollout(gw, slow, timeout_s=90)
        load.stop()
    assert run.outcome == "rolled_back", _story(run)
    last = run.events[-1]
    assert "failed: ttft_p99_ratio" in last["message"] and "shadow" not in last["message"]
    assert last["figures"]["ttft_p99_ratio"] > 1.25
    assert [v.name for v in gw.routes.route("llm").variants] == ["base"] and not load.result.errors


def test_candidate_with_diverging_tokens_is_rolled_back_on_agreement(upstream: str) -> None:
    with start(upstream) as gw, StreamLoad(gw.address, "llm", threads=2):
        run = run_rollout(gw, plan("changed-fp32-ort"), timeout_s=40)
    assert run.outcome == "rolled_back", _story(run)
    last = run.events[-1]
    assert "shadow phase failed: token_agreement" in last["message"]
    assert last["figures"]["token_agreement"] < 0.95 and last["figures"]["first_divergence_min"] is not None
    assert [v.name for v in gw.routes.route("llm").variants] == ["base"]
