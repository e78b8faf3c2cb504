"""Plain ``--precision int8`` measures whether depthwise convolutions are better kept in float."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from server.cli import main

pytestmark = pytest.mark.integration
RNG = np.random.default_rng(11)


def _mobile_block(path: Path, depthwise: bool = True) -> Path:
    """pointwise -> HardSwish -> depthwise 3x3 (channel ranges 10^3 apart, as after BatchNorm folding)
    -> HardSwish -> pointwise -> GlobalAveragePool -> Flatten -> Gemm: a MobileNetV3-style block."""
    c = 16
    scales = np.logspace(-1, 1, c, dtype=np.float32).reshape(c, 1, 1, 1)
    dw = (RNG.standard_normal((c, 1, 3, 3)) * scales).astype(np.float32) if depthwise else None
    dense = (RNG.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32)
    inits = {
        "p1": (RNG.standard_normal((c, 3, 1, 1)) * 0.5).astype(np.float32),
        "w": dw if dw is not None else dense,
        "p2": (RNG.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32),
        "g": (RNG.standard_normal((c, 4)) * 0.5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "p1"], ["a"], name="pw1"),
        helper.make_node("HardSwish", ["a"], ["ah"], name="hs1"),
        helper.make_node("Conv", ["ah", "w"], ["d"], name="dw", group=c if depthwise else 1, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["d"], ["dh"], name="hs2"),
        helper.make_node("Conv", ["dh", "p2"], ["e"], name="pw2"),
        helper.make_node("GlobalAveragePool", ["e"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "g"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _build(tmp_path: Path, model: Path) -> dict:
    calib, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=RNG.standard_normal((48, 3, 12, 12)).astype(np.float32))
    np.savez(held, x=RNG.standard_normal((48, 3, 12, 12)).astype(np.float32))
    repo = tmp_path / "repo"
    argv = ["build", str(model), "--name", "block", "--repo", str(repo), "--precision", "int8", "--calib", str(calib),
            "--eval", str(held), "--calib-cache", str(tmp_path / "cache"), "--allow-slower", "--skip-gate"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((repo / "block-int8-ort" / "1" / "kiln.json").read_text())


def test_depthwise_placement_is_measured_and_the_closer_one_published(tmp_path: Path) -> None:
    manifest = _build(tmp_path, _mobile_block(tmp_path / "block.onnx"))
    rows = manifest["build"]["quantization"]["calibration_choice"]
    labels = [r["method"] for r in rows]
    # each calibration method with the depthwise conv in int8 and in float, then bias correction on the best
    assert labels[:6] == ["entropy", "entropy, depthwise float", "percentile", "percentile, depthwise float",
                          "minmax", "minmax, depthwise float"]  # fmt: skip
    assert "+ bias correction" in labels[6]
    first = min(rows[:6], key=lambda r: (r["drop"], r["mse"]))
    chosen = next(r for r in rows if r.get("chosen"))
    assert (chosen["drop"], chosen["mse"]) <= (first["drop"], first["mse"])
    # on this block (channel ranges 10^3 apart) float depthwise is measured closer, and what is published
    # runs it in float: its weight is a float initializer, the pointwise convs read int8 weights
    assert chosen["float_depthwise"] == 1, rows
    model = onnx.load(str(tmp_path / "repo" / "block-int8-ort" / "1" / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    conv = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert conv["dw"].input[1] in inits and conv["pw1"].input[1] not in inits and conv["pw2"].input[1] not in inits
    assert manifest["build"]["quantization"]["excluded_nodes"] == ["dw"]


def test_models_without_depthwise_convs_get_no_extra_candidates(tmp_path: Path) -> None:
    manifest = _build(tmp_path, _mobile_block(tmp_path / "dense.onnx", depthwise=False))
    labels = [r["method"] for r in manifest["build"]["quantization"]["calibration_choice"]]
    assert labels[:3] == ["entropy", "percentile", "minmax"] and len(labels) == 4
    assert not any("depthwise" in label for label in labels)
