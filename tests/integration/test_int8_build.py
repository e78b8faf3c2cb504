"""`kiln build --precision int8|auto` of the example through the CLI: gate, publish, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders.example_builds import build_example_bad_int8, build_example_int8
from builders.examples import example_data_path, example_model_path
from server.cli import main

pytestmark = pytest.mark.integration


def _build(repo: Path, *extra: str) -> int:
    argv = ["build", str(example_model_path()), "--name", "digits", "--repo", str(repo)]
    argv += ["--calib", str(example_data_path()), "--calib-cache", str(repo.parent / "cache"), *extra]
    return main(argv)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(repo: Path, model: str, version: int) -> dict:
    return json.loads((repo / model / str(version) / "kiln.json").read_text())


def test_int8_build_is_validated_and_published_with_calibration(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert _build(repo, "--precision", "int8") == 0
    version = repo / "digits-int8-ort" / "1"
    manifest = _manifest(repo, "digits-int8-ort", 1)
    validation, calibration = manifest["validation"], manifest["calibration"]
    assert validation["passed"] and validation["gate"]["passed"] and not validation["gate"]["overridden"]
    assert validation["metric"] == "accuracy" and validation["drop"] <= 0.01
    assert validation["metrics"]["accuracy_candidate"] > 0.95
    assert set(validation["latency_ms"]) == {"1", "32"}
    assert calibration["tensors"] > 5 and not calibration["reused"]
    # --calib-method auto (the default): three methods from one pass, each validated, then the best
    # one with bias correction; the closest to FP32 is kept
    choice = manifest["build"]["quantization"]["calibration_choice"]
    methods = [r["method"] for r in choice]
    assert methods[:3] == ["entropy", "percentile", "minmax"] and methods[3].endswith(" + bias correction")
    best = min(choice, key=lambda r: (r["drop"], r["mse"]))
    assert best.get("chosen") and best["method"].startswith(calibration["method"])
    assert "calibration method (auto)" in (version / "report.md").read_text()
    for name in ("model.onnx", "report.md", "calibration.json", "calibration.cache"):
        assert (version / name).is_file(), name
    assert "Gate: **PASSED**" in (version / "report.md").read_text()
    assert (version / "model.onnx").stat().st_size < 0.3 * example_model_path().stat().st_size
    # same model, data and method: the calibration is reused
    assert _build(repo, "--precision", "int8") == 0
    assert _manifest(repo, "digits-int8-ort", 2)["calibration"]["reused"] is True


def test_destroyed_calibration_is_refused_and_nothing_is_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert _build(repo, "--precision", "fp32") == 0
    before = _tree(repo)
    assert _build(repo, "--precision", "int8", "--amax-scale", "0.02") == 5
    err = capsys.readouterr().err
    assert "over the 0.0100 budget by" in err and "nothing was published" in err and "--precision auto" in err
    assert _tree(repo) == before


def test_gate_override_publishes_and_records_the_failure(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    good = build_example_int8(repo, cache_dir=tmp_path / "cache")
    bad = build_example_bad_int8(repo, cache_dir=tmp_path / "cache")
    assert good.published is not None and bad.published is not None
    assert (good.published.version, bad.published.version) == (1, 2)
    gate = bad.published.manifest["validation"]["gate"]
    assert gate["passed"] is False and gate["overridden"] is True and gate["drop"] > 0.1
    assert any("overridden" in w for w in bad.warnings)
    good_amax = json.loads((good.published.path / "calibration.json").read_text())["amax"]["input"]
    bad_amax = json.loads((bad.published.path / "calibration.json").read_text())["amax"]["input"]
    assert bad_amax == pytest.approx(good_amax * 0.05)  # the published calibration is the one used


def test_auto_writes_tradeoff_table_and_plot(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert _build(repo, "--precision", "auto", "--amax-scale", "0.3", "--max-accuracy-drop", "0.005") == 0
    version = repo / "digits-auto-ort" / "1"
    table = (version / "tradeoff.md").read_text()
    for label in ("| int8 |", "fp16", "fp32", "(published)"):
        assert label in table
    assert (version / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "Precision trade-off" in (version / "report.md").read_text()
    auto = _manifest(repo, "digits-auto-ort", 1)["build"]["auto"]
    assert auto["sensitivity_mse"]  # the full INT8 failed, so layers were ranked
    chosen = next(r for r in auto["candidates"] if r["candidate"] == auto["chosen"])
    assert chosen["passed"] and auto["chosen_method"] == chosen["method"]
    # a CNN: no SmoothQuant or dynamic candidate (the graph has no LayerNorm-fed MatMul/Gemm)
    assert not auto["transformer"]
    assert {r["method"] for r in auto["candidates"]} <= {"static", "fp16", "fp32"}


def test_calib_read_write_round_trip(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert _build(repo, "--precision", "int8") == 0
    cache = repo / "digits-int8-ort" / "1" / "calibration.cache"
    assert main(["calib", "read", str(cache), "--json", str(tmp_path / "c.json")]) == 0
    assert main(["calib", "write", str(tmp_path / "c.json"), "--out", str(tmp_path / "c.cache")]) == 0
    assert (tmp_path / "c.cache").read_bytes() == cache.read_bytes()
    assert main(["calib", "read", str(tmp_path / "missing.cache")]) == 3


def test_fixed_batch_model_without_labels_is_gated_on_top1(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((41, 16)).astype(np.float32))
    argv = [
        "build",
        str(tmp_path / "m.onnx"),
        "--name",
        "fixed",
        "--precision",
        "int8",
        "--repo",
        str(tmp_path / "r"),
        "--allow-slower",
    ]  # a one-MatMul model: Q/DQ overhead makes INT8 slower, which is not this test's point
    assert main([*argv, "--calib", str(tmp_path / "d.npz")]) == 0
    validation = _manifest(tmp_path / "r", "fixed-int8-ort", 1)["validation"]
    assert validation["metric"] == "top1" and set(validation["latency_ms"]) == {"1"}
