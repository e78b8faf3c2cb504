"""``kiln bench --find-capacity`` against a real server whose knee is set by a known service time.

The server runs one instance with a 10 ms sleep per request (harness ``DelayFactory``), so it can
never answer more than 100 requests/s, and its p99 grows as the offered rate nears that ceiling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from builders.manifest import MANIFEST_NAME, build_manifest, file_checksums
from builders.model_config import ServingOptions
from builders.repository import read_model, verify_version
from core.errors import InvalidInputError, NotFoundError, RepositoryError
from harness.gateway import TOKEN, gateway_config, variant
from harness.serve import PAIR_SPECS, DelayFactory, make_identity_model, make_pair_model, write_model
from server.app import ServerHandle, start_server
from server.bench.capacity import CapacityResult, Run, SearchSettings, Slo, judge
from server.bench.record import capacity_entry, record_capacity
from server.bench.stats import make_point
from server.cli import main
from server.gateway.app import start_gateway

pytestmark = pytest.mark.integration
DELAY_S = 0.01
FAST = [
    "--level-seconds",
    "0.6,0.6",
    "--min-samples",
    "50",
    "--warmup",
    "0.1",
    "--precision",
    "0.15",
    "--repeats",
    "1",
    "--probe-concurrency",
    "8",
]


def publish_like_kiln(model_dir: Path, version: int) -> None:
    """A kiln.json for a plain test model, as publish writes it (checksums of the version's files)."""
    version_dir = model_dir / str(version)
    manifest = build_manifest(
        model_name=model_dir.name,
        source_path=version_dir / "model.onnx",
        source_sha256="0" * 64,
        precision="fp32",
        target="ort",
        artifact="model.onnx",
        files=file_checksums(version_dir),
    )
    manifest["version"] = version
    (version_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("capacity") / "repo"
    onnx_dir = tmp_path_factory.mktemp("onnx")
    pair = make_pair_model(onnx_dir / "pair.onnx")
    options = ServingOptions(max_batch_size=8, dynamic_batching=False)
    publish_like_kiln(write_model(root, "pair", {1: pair}, *PAIR_SPECS, options), 1)
    write_model(root, "broken", {1: pair}, *PAIR_SPECS, options)
    ident = make_identity_model(onnx_dir / "identity.onnx", width=4)
    write_model(root, "ident", {1: ident}, PAIR_SPECS[0], (PAIR_SPECS[1][0],), options)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, models=["pair"], runner_factory=DelayFactory(DELAY_S))
    yield handle
    handle.stop()


@pytest.mark.slow
def test_capacity_is_found_recorded_shown_and_turned_into_an_hpa(
    server: ServerHandle, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [
        "bench",
        "--url",
        server.url,
        "--model",
        "pair",
        "--find-capacity",
        "--slo-p99-ms",
        "500",
        *FAST,
        "--level-seconds",
        "1.5,1.5",
        "--start",
        "5",
        "--json",
        str(out / "c.json"),
        "--plot",
        str(out / "c.png"),
        "--record",
        "--repo",
        str(repo),
        "--hardware",
        "test-box",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "c.json").read_text())
    assert report["outcome"] == "found" and report["limited_by"] == "server", report["message"]
    assert report["versions"] == ["1"]
    capacity = report["capacity"]
    # one instance at 10 ms holds at most 100/s; a 1.5 s level cannot see a queue that grows by less than
    # 0.5 s (the SLO) in its time, i.e. rates up to 100 x (1 + 0.5 / 1.5) = 133/s may still pass
    assert 5 <= capacity <= 140
    assert report["failed_above"] > capacity
    assert report["confidence"]["runs"] == report["confidence"]["passes"] == 2
    assert report["runs"][0]["phase"] == "probe" and {"explore", "confirm"} <= {r["phase"] for r in report["runs"]}
    assert (out / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert f"capacity {capacity:g} requests/s" in printed and "recorded" in printed

    manifest = json.loads((repo / "pair" / "1" / MANIFEST_NAME).read_text())
    [entry] = [e for e in manifest["capacity"] if e["endpoint"]["url"] == server.url]
    assert entry["capacity"] == capacity and entry["mode"] == "rate" and entry["precision"] == "fp32"
    assert entry["slo"] == {"p99_ms": 500.0, "error_rate": 0.0} and entry["hardware"]["label"] == "test-box"
    assert entry["batch"]["max_batch_size"] == 8 and entry["batch"]["request_batch"] == 1
    pair = read_model(repo, "pair")
    assert verify_version(pair, pair.versions[0]) == []  # recording leaves the checksums valid

    assert main(["repo", "show", "pair", "--repo", str(repo)]) == 0
    shown = capsys.readouterr().out
    assert "capacity" in shown and f"{capacity:g} requests/s" in shown and "p99 <= 500 ms" in shown

    assert main(["deploy", "autoscale", "--model", "pair", "--repo", str(repo), "--headroom", "0.5"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    triton, gateway = docs
    target = triton["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert float(target.rstrip("m")) / (1000 if target.endswith("m") else 1) == pytest.approx(capacity * 0.5, abs=0.001)
    assert triton["spec"]["metrics"][0]["pods"]["metric"]["selector"] == {"matchLabels": {"model": "pair"}}
    assert gateway["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_an_slo_no_level_meets_exits_non_zero_with_the_lowest_level(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "bench",
            "--url",
            server.url,
            "--model",
            "pair",
            "--find-capacity",
            "--slo-p99-ms",
            "2",
            "--start",
            "5",
            *FAST,
            "--probe-concurrency",
            "0",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "no load level met the SLO (p99 <= 2 ms" in printed and "the lowest level, 5 requests/s" in printed


def test_an_endpoint_failing_every_request(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with start_server(repo, models=["broken"], runner_factory=DelayFactory(0.0, fail_every=1)) as handle:
        code = main(
            [
                "bench",
                "--url",
                handle.url,
                "--model",
                "broken",
                "--find-capacity",
                "--slo-p99-ms",
                "50",
                "--start",
                "20",
                *FAST,
            ]
        )
    printed = capsys.readouterr().out
    assert code == 1
    assert "every request failed (INVALID_ARGUMENT: injected failure" in printed and "check the URL" in printed


def test_a_rate_beyond_the_load_generator_is_called_the_clients_limit(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with start_server(repo, models=["ident"]) as handle:
        code = main(
            [
                "bench",
                "--url",
                handle.url,
                "--model",
                "ident",
                "--find-capacity",
                "--slo-p99-ms",
                "1000",
                "--start",
                "1000000",
                "--max-load",
                "1000000",
                *FAST,
                "--probe-concurrency",
                "0",
                "--level-seconds",
                "0.3,0.3",
                "--warmup",
                "0",
            ]
        )
    printed = capsys.readouterr().out.replace("\n", " ")
    assert code == 1
    assert "the load generator sent only" in printed and "1e+06/s offered" in printed
    assert "another machine" in printed


def test_bad_capacity_flags_are_refused(server: ServerHandle) -> None:
    base = ["bench", "--url", server.url, "--model", "pair"]
    assert main([*base, "--find-capacity"]) == 2  # no --slo-p99-ms
    assert main([*base, "--find-capacity", "--slo-p99-ms", "-1"]) == 2
    assert main([*base, "--find-capacity", "--slo-p99-ms", "50", "--slo-error-rate", "2"]) == 2
    assert main([*base, "--find-capacity", "--slo-p99-ms", "50", "--level-seconds", "3"]) == 2
    assert main([*base, "--find-capacity", "--slo-p99-ms", "50", "--rate", "10"]) == 2
    assert main([*base, "--record", "--rate", "10"]) == 2


@pytest.mark.slow
def test_closed_loop_concurrency_capacity(server: ServerHandle, tmp_path: Path) -> None:
    """At 10 ms per request, c requests in flight wait about c x 10 ms: p99 <= 1 s holds to ~100."""
    out = tmp_path / "c.json"
    code = main(
        [
            "bench",
            "--url",
            server.url,
            "--model",
            "pair",
            "--find-capacity",
            "--slo-p99-ms",
            "1000",
            "--capacity-mode",
            "concurrency",
            *FAST,
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert code == 0 and report["mode"] == "concurrency", report["message"]
    assert report["capacity"] == int(report["capacity"]) and 1 <= report["capacity"] <= 105
    assert report["failed_above"] > report["capacity"]
    assert all(r["point"]["mode"] == "concurrency" for r in report["runs"])  # no open-loop probe here


@pytest.mark.slow
def test_capacity_of_one_variant_through_the_gateway(server: ServerHandle, tmp_path: Path) -> None:
    routes = {"pub": {"variants": [variant("a", "pair", 50), variant("b", "pair", 50)]}}
    config = gateway_config({"up": server.url}, routes)
    out = tmp_path / "g.json"
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=()) as gateway:
        code = main(
            [
                "bench",
                "--url",
                gateway.address,
                "--model",
                "pub",
                "--find-capacity",
                "--slo-p99-ms",
                "500",
                *FAST,
                "--variant",
                "b",
                "--by-variant",
                "--json",
                str(out),
            ]
        )
    report = json.loads(out.read_text())
    assert code == 0 and report["variant"] == "b" and report["capacity"] > 0, report["message"]
    served = {name for r in report["runs"] for name in r["point"]["variants"]}
    assert served == {"b"}  # every request of every level was pinned to variant b


def found(capacity: float = 50.0, p99_ms: float = 100.0) -> CapacityResult:
    point = make_point("rate", capacity, [10_000_000] * 100, {}, 10**9)
    run = Run(capacity, "confirm", point, judge(point, Slo(p99_ms), SearchSettings()))
    return CapacityResult(
        mode="rate",
        slo=Slo(p99_ms),
        outcome="found",
        capacity=capacity,
        limited_by="server",
        message="",
        runs=(run,),
        knee_runs=1,
        knee_passes=1,
        knee_p99_ms=(10.0,),
    )


def entry_for(result: CapacityResult, label: str = "box") -> Callable[[str | None, dict[str, Any]], dict[str, Any]]:
    def build(precision: str | None, serving: dict[str, Any]) -> dict[str, Any]:
        return capacity_entry(
            result,
            url="u",
            served_model="pair",
            variant="",
            request_batch=1,
            precision=precision,
            serving=serving,
            hardware={"label": label},
        )

    return build


def test_record_replaces_a_measurement_under_the_same_conditions_only(repo: Path) -> None:
    record_capacity(repo, "pair", ("1",), "", entry_for(found(40.0)))
    record_capacity(repo, "pair", ("1",), "", entry_for(found(45.0)))  # same SLO, batch, hardware: replaces
    record_capacity(repo, "pair", ("1",), "", entry_for(found(60.0, p99_ms=200.0)))  # another SLO: kept beside
    record_capacity(repo, "pair", ("1",), "", entry_for(found(30.0), label="other-box"))
    entries = json.loads((repo / "pair" / "1" / MANIFEST_NAME).read_text())["capacity"]
    mine = {(e["slo"]["p99_ms"], e["hardware"]["label"]): e["capacity"] for e in entries if e["endpoint"]["url"] == "u"}
    assert mine == {(100.0, "box"): 45.0, (200.0, "box"): 60.0, (100.0, "other-box"): 30.0}


def test_record_refuses_what_it_cannot_place(repo: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"reports versions \['1', '2'\] of 'pair'; pass --version"):
        record_capacity(repo, "pair", ("1", "2"), "", entry_for(found()))
    with pytest.raises(NotFoundError, match=r"version 7 of 'pair' is not in the repository \(published: \[1\]\)"):
        record_capacity(repo, "pair", ("1",), "7", entry_for(found()))
    with pytest.raises(RepositoryError, match="kiln.json is missing"):
        record_capacity(repo, "broken", ("1",), "", entry_for(found()))  # a plain Triton model: no manifest
    nothing = CapacityResult(
        mode="rate",
        slo=Slo(50.0),
        outcome="none",
        capacity=None,
        limited_by="server",
        message="no load level met the SLO",
        runs=(),
    )
    with pytest.raises(InvalidInputError, match="nothing to record: no load level met the SLO"):
        capacity_entry(
            nothing, url="u", served_model="m", variant="", request_batch=1, precision=None, serving={}, hardware={}
        )


def test_deploy_autoscale_without_a_recorded_capacity_says_how_to_get_one(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "autoscale", "--model", "ident", "--repo", str(repo)]) == 3
    assert main(["deploy", "autoscale", "--model", "pair", "--repo", str(repo), "--metric", "concurrency"]) == 3
    err = capsys.readouterr().err.replace("\n", " ")
    assert "no recorded concurrency capacity" in err and "--find-capacity" in err
    assert main(["deploy", "autoscale", "--model", "nope", "--repo", str(repo)]) == 3
