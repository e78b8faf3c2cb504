"""Validation that compares only real-token positions, pooled cosine, and dynamic INT8's error profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.calib_data import ShapeGroup, make_dataset
from builders.dynamic_quant import MAX_FLOAT_LAYERS, _dynamic_error, error_profile, search_dynamic
from builders.validate import GateSettings, attention_mask_input, compare, metric_drop
from core.errors import InvalidInputError


def test_padding_positions_are_never_compared() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 4))
    cand = ref.copy()
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cand[0, 3:] += 100.0  # garbage where the mask says padding
    masked = compare([ref], [cand], [], [mask])
    assert masked["max_abs_error"] == 0.0 and masked["cosine"] == pytest.approx(1.0)
    assert masked["pooled_cosine"] == pytest.approx(1.0) and masked["compared_positions"] == 8
    unmasked = compare([ref], [cand], [])
    assert unmasked["max_abs_error"] == pytest.approx(100.0) and unmasked["pooled_cosine"] < 0.99


def test_pooled_cosine_is_the_cosine_of_masked_mean_embeddings() -> None:
    ref = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    cand = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = np.array([[1, 1, 0]])
    got = compare([ref], [cand], [], [mask])
    a, b = np.array([0.5, 0.5]), np.array([1.0, 0.5])
    assert got["pooled_cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert metric_drop(got, "pooled-cosine") == pytest.approx(1 - got["pooled_cosine"])


def test_batches_of_different_sequence_lengths_compare() -> None:
    ref = [np.ones((2, 3, 4)), np.ones((1, 7, 4))]
    cand = [np.ones((2, 3, 4)), np.full((1, 7, 4), 2.0)]
    masks = [np.ones((2, 3), np.int64), np.ones((1, 7), np.int64)]
    got = compare(ref, cand, [], masks)
    assert got["compared_positions"] == 13 and got["cosine"] == pytest.approx(1.0)
    assert got["mse"] == pytest.approx(7 * 4 / (13 * 4))


def test_mask_input_is_found_by_name_and_must_be_0_or_1() -> None:
    ids = np.ones((3, 4), np.int64)
    good = make_dataset([ShapeGroup({"input_ids": ids, "attention_mask": np.ones((3, 4), np.int64)})], "d")
    assert attention_mask_input(good) == "attention_mask"
    assert attention_mask_input(make_dataset([ShapeGroup({"x": np.ones((3, 4), np.float32)})], "d")) is None
    bad_mask = np.ones((3, 4), np.int64)
    bad_mask[1, 2] = -1
    bad = make_dataset([ShapeGroup({"input_ids": ids, "attention_mask": bad_mask})], "tokens.npz")
    with pytest.raises(InvalidInputError, match=r"holds -1 at sample 1, position 2"):
        attention_mask_input(bad)


def test_default_gate_metric_for_masked_sequences_is_pooled_cosine() -> None:
    assert GateSettings().resolved_metric(has_labels=False, has_mask=True) == "pooled-cosine"
    assert GateSettings().resolved_metric(has_labels=True, has_mask=True) == "accuracy"
    with pytest.raises(InvalidInputError, match="use --metric cosine"):
        metric_drop(compare([np.ones((2, 3))], [np.ones((2, 3))], []), "pooled-cosine")


# ----------------------------------------------------------------------------- dynamic INT8


def _two_layer_model(outlier: float):  # type: ignore[no-untyped-def]
    """x -> MatMul(w1) -> h; h * s (one channel scaled by ``outlier``) -> MatMul(w2) -> y."""
    rng = np.random.default_rng(0)
    scale = np.ones(16, np.float32)
    scale[3] = outlier
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2")]
    inits.append(numpy_helper.from_array(scale, "s"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("Mul", ["h", "s"], ["hs"], name="outlier"),
        helper.make_node("MatMul", ["hs", "w2"], ["y"], name="second"),
    ]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_error_is_zero_when_values_are_exactly_representable() -> None:
    x = np.array([[0.0, 1.0, 2.0, 255.0]], np.float32)
    w = np.array([[127.0], [0.0], [-127.0], [1.0]], np.float32)
    assert _dynamic_error(x, w) == pytest.approx(0.0, abs=1e-12)
    outlier = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    outlier[:, 0] *= 500
    assert _dynamic_error(outlier, np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)) > 1e-6


def test_error_profile_ranks_the_layer_fed_by_an_outlier_channel_first() -> None:
    data = make_dataset([ShapeGroup({"x": np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)})], "d")
    profile = error_profile(_two_layer_model(outlier=200.0), data)
    assert list(profile) == ["second", "first"] and profile["second"] > 10 * profile["first"]


def test_dynamic_search_keeps_layers_float_until_the_gate_passes(tmp_path: Path) -> None:
    model = _two_layer_model(outlier=200.0)
    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(model, str(path))
    data = make_dataset([ShapeGroup({"x": np.random.default_rng(3).standard_normal((32, 16)).astype(np.float32)})], "d")
    strict = search_dynamic(path, model, data, GateSettings(metric="cosine", max_drop=1e-7), tmp_path)
    assert [step["float_layers"] for step in strict.tried][:2] == [[], ["second"]]
    assert len(strict.tried) <= MAX_FLOAT_LAYERS + 1 and strict.chosen.path.is_file()
    loose = search_dynamic(path, model, data, GateSettings(metric="cosine", max_drop=0.5), tmp_path)
    assert loose.validation.passed and loose.chosen.float_layers == () and len(loose.tried) == 1
