"""Latency-aware INT8 on the ORT target: op patterns measured per ISA (cached), slow ops kept float,
an INT8 slower than FP32 refused unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.op_speed import PATTERNS, cache_key, compute_nodes, load_or_measure, pattern_of, slow_nodes
from builders.quantize import choose_ort_format, cpu_flags
from builders.request import Int8Options
from builders.validate import Validation
from core.errors import AccuracyGateError
from server.cli import main

pytestmark = pytest.mark.integration


def _separable(path: Path) -> Path:
    """x -> depthwise 3x3 -> pointwise 1x1 -> dense 3x3: one node of each conv pattern."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "dw"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "pw"),
        numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "dense"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw"], ["a"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "pw"], ["b"], name="pointwise"),
        helper.make_node("Conv", ["b", "dense"], ["y"], name="dense", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])
    graph = helper.make_graph(nodes, "sep", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _write_ratios(repo: Path, ratios: dict[str, float]) -> None:
    """The op-speed cache as a measurement on this machine would leave it (so the test is deterministic)."""
    fmt = choose_ort_format(cpu_flags())
    key = cache_key(cpu_flags(), ort.__version__, fmt.name)
    path = repo.resolve().parent / ".kiln-cache" / "op-speed" / f"op-speed-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ratios": ratios}))


def test_patterns_are_classified_from_weights(tmp_path: Path) -> None:
    model = onnx.load(str(_separable(tmp_path / "sep.onnx")))
    weights = {i.name: i for i in model.graph.initializer}
    assert [pattern_of(n, weights) for n in model.graph.node] == ["conv-depthwise", "conv-pointwise", "conv-dense"]
    ratios = {"conv-depthwise": 1.4, "conv-pointwise": 0.5, "conv-dense": 0.3, "matmul": 0.4}
    slow = slow_nodes(model, ratios)
    assert list(slow) == ["depthwise"] and "1.40x slower" in slow["depthwise"]
    assert compute_nodes(model) == ["depthwise", "pointwise", "dense"]


@pytest.mark.slow
def test_measurement_is_cached_per_isa(tmp_path: Path) -> None:
    fmt = choose_ort_format(cpu_flags()).name
    first = load_or_measure(tmp_path, cpu_flags(), fmt)
    assert set(first) == set(PATTERNS) and all(r > 0 for r in first.values())
    files = list(tmp_path.glob("op-speed-*.json"))
    assert len(files) == 1
    files[0].write_text(json.dumps({"ratios": dict.fromkeys(PATTERNS, 7.0)}))
    assert load_or_measure(tmp_path, cpu_flags(), fmt) == dict.fromkeys(PATTERNS, 7.0)  # read, not measured again


def test_slow_patterns_stay_float_and_are_reported(tmp_path: Path) -> None:
    model = _separable(tmp_path / "sep.onnx")
    repo = tmp_path / "repo"
    _write_ratios(repo, {"conv-depthwise": 1.4, "conv-pointwise": 0.5, "conv-dense": 0.3, "matmul": 0.4})
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((40, 8, 16, 16)).astype(np.float32))
    argv = ["build", str(model), "--name", "sep", "--precision", "int8", "--repo", str(repo), "--calib",
            str(tmp_path / "d.npz"), "--skip-gate", "--allow-slower"]  # fmt: skip
    assert main(argv) == 0  # --allow-slower: everything quantized
    assert main(argv[:-1]) in (0, 5)  # measured placement: depthwise kept float (then gated on speed, which varies)
    published = sorted(repo.glob("sep-int8-ort/*/kiln.json"))
    everything = json.loads(published[0].read_text())["build"]["quantization"]
    assert everything["slower_in_int8"] == []
    if len(published) > 1:
        measured = json.loads(published[1].read_text())["build"]["quantization"]
        assert measured["slower_in_int8"] == ["depthwise"]
        assert "node depthwise" in measured["float_reasons"]


def test_a_model_whose_every_op_is_slower_is_refused_before_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _separable(tmp_path / "sep.onnx")
    repo = tmp_path / "repo"
    _write_ratios(repo, {"conv-depthwise": 1.4, "conv-pointwise": 1.2, "conv-dense": 1.1, "matmul": 0.4})
    np.savez(tmp_path / "d.npz", x=np.ones((8, 8, 16, 16), np.float32))
    argv = ["build", str(model), "--name", "sep", "--precision", "int8", "--repo", str(repo), "--calib",
            str(tmp_path / "d.npz")]  # fmt: skip
    assert main(argv) == 5
    err = " ".join(capsys.readouterr().err.split())
    assert "every quantizable op of this model (3 ops) runs slower in INT8" in err and "conv-depthwise 1.40x" in err
    assert "--allow-slower" in err and not list(repo.glob("sep-int8-ort/*"))
    assert not (repo.resolve().parent / ".kiln-cache" / "calib").exists()  # refused before any calibration


def test_speed_gate_refuses_an_int8_slower_at_every_batch_size() -> None:
    from builders.int8_build import check_speed

    def validation(*speedups: float) -> Validation:
        sizes = zip((1, 32), speedups, strict=False)
        rows = {str(b): {"reference": 1.0, "candidate": 1.0 / s, "speedup": s} for b, s in sizes}
        return Validation("top1", 0.01, 0.0, {}, rows, 10, "0" * 64)

    with pytest.raises(AccuracyGateError, match=r"speed gate: .*batch 1: 0\.53x, batch 32: 0\.80x"):
        check_speed(validation(0.53, 0.80), Int8Options())
    check_speed(validation(0.53, 1.30), Int8Options())  # faster at the max batch: published
    check_speed(validation(0.53, 0.80), Int8Options(allow_slower=True))  # asked for


def test_keep_float_first_and_last_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _separable(tmp_path / "sep.onnx")
    repo = tmp_path / "repo"
    _write_ratios(repo, dict.fromkeys(PATTERNS, 0.5))  # every pattern faster here: only --keep-float decides
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((40, 8, 16, 16)).astype(np.float32))
    argv = ["build", str(model), "--name", "sep", "--precision", "int8", "--repo", str(repo), "--calib",
            str(tmp_path / "d.npz"), "--skip-gate", "--allow-slower"]  # fmt: skip
    assert main([*argv, "--keep-float", "first,last"]) == 0
    quant = json.loads((repo / "sep-int8-ort" / "1" / "kiln.json").read_text())["build"]["quantization"]
    assert quant["float_reasons"]["node depthwise"] == "kept float (--keep-float first)"
    assert quant["float_reasons"]["node dense"] == "kept float (--keep-float last)"
    graph = onnx.load(str(repo / "sep-int8-ort" / "1" / "model.onnx")).graph
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    assert convs["depthwise"].input[1] not in produced_by_dq and convs["dense"].input[1] not in produced_by_dq
    assert convs["pointwise"].input[1] in produced_by_dq  # the middle layer is INT8
    assert main([*argv, "--keep-float", "no_such_layer"]) == 2
    assert "--keep-float 'no_such_layer' is neither first, last nor a node" in " ".join(capsys.readouterr().err.split())


def test_equalize_flag_rescales_relu_conv_pairs_and_keeps_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * np.logspace(-2, 1, 8)[:, None, None, None])
                                     .astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))  # fmt: skip
    repo = tmp_path / "repo"
    _write_ratios(repo, dict.fromkeys(PATTERNS, 0.5))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 8, 16, 16)).astype(np.float32))
    argv = ["build", str(tmp_path / "m.onnx"), "--name", "eq", "--precision", "int8", "--repo", str(repo),
            "--calib", str(tmp_path / "d.npz"), "--skip-gate", "--allow-slower", "--equalize"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((repo / "eq-int8-ort" / "1" / "kiln.json").read_text())
    captured = capsys.readouterr()
    assert "cross-layer equalization rescaled 1 conv pair(s)" in " ".join((captured.out + captured.err).split())
    assert manifest["validation"]["metrics"]["cosine"] > 0.99
