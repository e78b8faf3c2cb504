"""The Envoy data plane's pure parts: config rendering, runtime weights, access-log parsing, change shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from server.gateway.config import parse_config, parse_route
from server.gateway.envoy import render
from server.gateway.envoy.access_log import parse_line
from server.gateway.envoy.descriptor import descriptor_set
from server.gateway.envoy.lua import lua_string, rewrite_script
from server.gateway.envoy.plane import only_removes, structure

UPSTREAMS = {"up": {"address": "127.0.0.1:8001"}, "other": {"address": "models.internal:8001"}}


def config(routes: dict[str, Any], **extra: Any) -> Any:
    return parse_config({"upstreams": UPSTREAMS, "routes": routes, **extra})


def v(name: str, model: str, weight: float, upstream: str = "up", version: str = "") -> dict[str, Any]:
    return {"name": name, "upstream": upstream, "model": model, "weight": weight, "version": version}


def route(*variants: dict[str, Any], **extra: Any) -> Any:
    return parse_route(
        "digits", {"variants": list(variants), **extra}, parse_config({"upstreams": UPSTREAMS}).upstreams
    )


def test_weights_become_integers_that_sum_exactly() -> None:
    thirds = route(v("a", "m", 33.33), v("b", "m", 33.33), v("c", "m", 33.34))
    assert render.weight_units(thirds) == [3333, 3333, 3334]
    odd = route(v("a", "m", 99.995), v("b", "m", 0.005))
    assert sum(render.weight_units(odd)) == 10_000


def test_runtime_weights_move_an_ejected_variant_to_its_baseline() -> None:
    routes = {"digits": route(v("a", "m", 80), v("b", "m", 15, "other"), v("c", "m", 5))}
    key = f"{render.runtime_prefix('digits')}.digits/"
    assert render.runtime_weights(routes) == {key + "a": 8000, key + "b": 1500, key + "c": 500}
    assert render.runtime_weights(routes, frozenset({"other"})) == {key + "a": 9500, key + "b": 0, key + "c": 500}
    # the baseline's upstream ejected: its share goes to the heaviest healthy variant
    assert render.runtime_weights(routes, frozenset({"up"})) == {key + "a": 0, key + "b": 10000, key + "c": 0}
    # everything ejected: weights unchanged rather than no traffic anywhere
    assert render.runtime_weights(routes, frozenset({"up", "other"}))[key + "a"] == 8000


def test_route_entries_pins_first_then_control_methods_then_the_split() -> None:
    r = route(v("a", "digits-fp32", 90), v("b", "digits-int8", 10), sticky="header:x-user",
              shadow={"variant": "b", "percent": 12.5})  # fmt: skip
    entries = render.public_routes("digits", r)
    names = [e["name"] for e in entries]
    assert names == [
        "digits:ModelStreamInfer", "digits:version:ModelInfer", "digits:version:ModelStreamInfer",
        "digits:pin:a", "digits:pin:b", "digits:pin:unknown",
        *(f"digits:{m}" for m in render.CONTROL_METHODS), "digits:split",
    ]  # fmt: skip
    closed = render.public_routes("digits", route(v("a", "digits-fp32", 100), v("b", "digits-int8", 0)))
    delegated = {e["name"]: e["route"] for e in closed if e.get("route", {}).get("prefix_rewrite")}
    # a pin of a weight-0 variant and a client's model_version: the Python plane's rules, beside Envoy
    assert set(delegated) == {"digits:version:ModelInfer", "digits:version:ModelStreamInfer",
                              "digits:pin:b:ModelInfer", "digits:pin:b:ModelStreamInfer"}  # fmt: skip
    assert delegated["digits:pin:b:ModelInfer"]["prefix_rewrite"] == f"/{render.DELEGATED_SERVICE}/ModelInfer"
    split = entries[-1]["route"]
    assert split["weighted_clusters"]["use_hash_policy"] is True
    assert split["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    assert split["weighted_clusters"]["runtime_key_prefix"] == render.runtime_prefix("digits")
    mirror = split["request_mirror_policies"][0]
    assert mirror["cluster"] == render.LOCAL_CLUSTER  # the comparator asks baseline and shadow
    assert mirror["runtime_fraction"]["default_value"] == {"numerator": 125_000, "denominator": "MILLION"}
    assert split["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}  # the client's deadline applies


def test_streams_stay_on_envoy_only_when_no_name_changes() -> None:
    assert render.streams_via_kiln("digits", route(v("a", "digits-fp32", 100)))
    assert render.streams_via_kiln("digits", route(v("a", "digits", 100, version="2")))
    same = route(v("a", "digits", 50), v("b", "digits", 50, "other"))
    assert not render.streams_via_kiln("digits", same)
    assert "digits:ModelStreamInfer" not in [e["name"] for e in render.public_routes("digits", same)]


def test_unrouted_and_unreadable_requests_get_grpc_statuses_from_envoy() -> None:
    cfg = config({"digits": {"variants": [v("a", "m", 100)]}})
    entries = render.render_route_config(cfg, cfg.routes)["virtual_hosts"][0]["routes"]
    unknown = next(e for e in entries if e["name"] == "unknown-model")
    headers = {h["header"]["key"]: h["header"]["value"] for h in unknown["response_headers_to_add"]}
    assert headers["grpc-status"] == "5" and "%REQ(x-kiln-model)%" in headers["grpc-message"]
    assert "routed models are ['digits']" in headers["grpc-message"]
    unreadable = next(e for e in entries if e["name"] == "unreadable:ModelInfer")
    assert {h["header"]["key"]: h["header"]["value"] for h in unreadable["response_headers_to_add"]}[
        "grpc-status"
    ] == "3"
    passthrough = config({"digits": {"variants": [v("a", "m", 100)]}}, unknown_models="passthrough",
                         default_upstream="up")  # fmt: skip
    names = [
        e["name"] for e in render.render_route_config(passthrough, passthrough.routes)["virtual_hosts"][0]["routes"]
    ]
    assert "passthrough" in names and "unknown-model" not in names


def test_clusters_per_variant_with_rewrite_and_trailers_and_dns_for_names() -> None:
    cfg = config({"digits": {"variants": [v("a", "digits-fp32", 100), v("b", "digits-int8", 0, "other")]}})
    clusters = {c["name"]: c for c in render.render_clusters(cfg, cfg.routes, 2**20, "127.0.0.1:9")}
    assert set(clusters) == {"digits/a", "digits/b", "upstream:up", "upstream:other", render.LOCAL_CLUSTER}
    assert clusters["digits/a"]["type"] == "STATIC" and clusters["digits/b"]["type"] == "STRICT_DNS"
    options = clusters["digits/b"]["typed_extension_protocol_options"][render._HTTP_OPTIONS]
    names = [f["name"] for f in options["http_filters"]]
    assert names == ["kiln.rewrite", "kiln.trailers", "envoy.filters.http.upstream_codec"]
    trailers = options["http_filters"][1]["typed_config"]["mutations"]["response_trailers_mutations"]
    assert [t["append"]["header"] for t in trailers] == [{"key": "kiln-variant", "value": "b"},
                                                         {"key": "kiln-model", "value": "digits"}]  # fmt: skip
    assert clusters["digits/a"]["outlier_detection"]["consecutive_5xx"] == cfg.resilience.failures_to_eject


def test_bootstrap_is_static_for_validation_and_file_based_for_running(tmp_path: Path) -> None:
    layout = render.Layout("127.0.0.1", 0, 0, tmp_path)
    running = render.render_bootstrap(layout)
    assert running["dynamic_resources"]["cds_config"]["path_config_source"]["path"] == str(layout.cds_path)
    manager = running["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["rds"]["config_source"]["path_config_source"]["watched_directory"]["path"] == str(tmp_path / "xds")
    assert running["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    static = render.render_bootstrap(layout, [], {"name": "kiln", "virtual_hosts": []})
    assert "dynamic_resources" not in static and static["static_resources"]["clusters"] == []


def test_access_log_lines_become_metric_records() -> None:
    path = "/inference.GRPCInferenceService/ModelInfer"
    assert parse_line(f"digits/b 0 530 400 410 {path} 1 b -") == [("digits", "b", "OK", 400_000, 530_000)]
    # no upstream answer (deadline): the upstream share runs until Envoy gave up
    assert parse_line(f"digits/b 4 200100 - 200050 {path} 1 - -") == [
        ("digits", "b", "DEADLINE_EXCEEDED", 200_050_000, 200_100_000)
    ]
    assert parse_line(f"upstream:up 0 90 80 85 {path} 1 - -")[0][:3] == ("(passthrough)", "up", "OK")
    assert parse_line(f"- 5 30 - - {path} 1 - -") == []  # answered by Envoy itself
    assert parse_line("digits/b 0 30 20 25 /inference.GRPCInferenceService/ModelReady 1 - -") == []
    assert parse_line(f"kiln:local 0 30 20 25 {path} 1 - -") == []
    retried = parse_line(f"digits/b 0 900 500 510 {path} 2 a -")
    assert [r[:3] for r in retried] == [("digits", "b", "UNAVAILABLE"), ("digits", "a", "OK")]
    assert parse_line("garbage") == []
    # no grpc-status: Envoy's response flags say why (client deadline, cancel, upstream gone)
    assert parse_line(f"digits/b - 200100 - 200050 {path} 1 - - DR 200m 200")[0][2] == "DEADLINE_EXCEEDED"
    # reset before any answer: no microsecond end point, Envoy's whole-ms duration stands in
    assert parse_line(f"digits/b - - - - {path} 1 - - DR 200m 201")[0][3:] == (201_000_000, 201_000_000)
    assert parse_line(f"digits/b - 900 - 850 {path} 1 - - DR -")[0][2] == "CANCELLED"
    assert parse_line(f"digits/b - 900 - 850 {path} 1 - - UF -")[0][2] == "UNAVAILABLE"


def test_structure_ignores_weights_and_removals_need_no_validation() -> None:
    current = {"digits": route(v("a", "m", 90), v("b", "n", 10), shadow={"variant": "b", "percent": 5})}
    reweighted = {"digits": route(v("a", "m", 50), v("b", "n", 50), shadow={"variant": "b", "percent": 50})}
    assert structure(current) == structure(reweighted)
    rolled_back = {"digits": route(v("a", "m", 100))}
    assert structure(rolled_back) != structure(current) and only_removes(current, rolled_back)
    assert only_removes(current, {})
    promoted = {"digits": route(v("b", "n", 100))}  # the baseline changes: not a mere removal
    assert not only_removes(current, promoted)
    candidate = {"digits": route(v("a", "m", 90), v("c", "other-model", 10))}
    assert not only_removes(current, candidate)
    assert not only_removes(current, {**current, "new": route(v("a", "m", 100))})


def test_lua_literals_and_rewrite_constants() -> None:
    assert lua_string(b'a"\n\x00') == '"\\97\\34\\10\\0"'
    script = rewrite_script("digits-int8", "2", "digits")
    assert script.startswith("local REQUEST_SUFFIX = " + lua_string(b"\x0a\x0bdigits-int8\x12\x012"))
    assert "envoy_on_request" in script and "envoy_on_response" in script


def test_descriptor_set_holds_the_kserve_service_and_its_dependencies() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    assert [f.name for f in files.file] == ["model_config.proto", "grpc_service.proto"]
    service = files.file[1].service[0]
    assert (files.file[1].package, service.name) == ("inference", "GRPCInferenceService")
    assert "ModelInfer" in [m.name for m in service.method]
