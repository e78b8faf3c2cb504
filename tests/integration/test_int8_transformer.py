"""INT8 of a (tiny, real-structured) BERT encoder through the CLI: dynamic mode, masked validation, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builders.validate import SPEED_TIE
from harness.real_models import minilm_onnx
from server.cli import main

pytestmark = pytest.mark.integration

HIDDEN, INTER, VOCAB = 32, 64, 50


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
        "embeddings.position_embeddings.weight": (32, HIDDEN),
        "embeddings.token_type_embeddings.weight": (2, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,),
        "embeddings.LayerNorm.bias": (HIDDEN,),
    }
    for i in range(2):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{n}.weight"] = (HIDDEN, HIDDEN)
            shapes[f"{p}.attention.self.{n}.bias"] = (HIDDEN,)
        shapes |= {
            f"{p}.attention.output.dense.weight": (HIDDEN, HIDDEN), f"{p}.attention.output.dense.bias": (HIDDEN,),
            f"{p}.attention.output.LayerNorm.weight": (HIDDEN,), f"{p}.attention.output.LayerNorm.bias": (HIDDEN,),
            f"{p}.intermediate.dense.weight": (INTER, HIDDEN), f"{p}.intermediate.dense.bias": (INTER,),
            f"{p}.output.dense.weight": (HIDDEN, INTER), f"{p}.output.dense.bias": (HIDDEN,),
            f"{p}.output.LayerNorm.weight": (HIDDEN,), f"{p}.output.LayerNorm.bias": (HIDDEN,),
        }  # fmt: skip
    w = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}
    for k in w:
        if k.endswith("LayerNorm.weight"):
            w[k] = 1.0 + 0.1 * w[k]
    return w


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    onnx.save(minilm_onnx(_weights(), layers=2, heads=4, hidden=HIDDEN), str(path))
    return path


def _tokens(n: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, size=(n, seq)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _build(encoder: Path, repo: Path, *extra: str) -> int:
    # a tiny encoder: INT8 may well be slower than FP32 at this size, which these tests do not judge
    argv = ["build", str(encoder), "--name", "bert", "--repo", str(repo), "--precision", "int8", "--allow-slower"]
    return main([*argv, *extra])


def test_dynamic_int8_needs_no_calibration_and_is_gated_on_pooled_cosine(encoder: Path, tmp_path: Path) -> None:
    evaluation = _save(tmp_path / "eval.npz", _tokens(24, 12, seed=1))
    assert _build(encoder, tmp_path / "repo", "--int8-mode", "dynamic", "--eval", str(evaluation)) == 0
    version = tmp_path / "repo" / "bert-int8-ort" / "1"
    manifest = json.loads((version / "kiln.json").read_text())
    quant = manifest["build"]["quantization"]
    assert quant["mode"] == "dynamic" and quant["quantized_layers"] + len(quant["float_layers"]) == 12
    assert quant["quantized_embeddings"] == 2  # word and token-type tables stored int8
    validation = manifest["validation"]
    assert validation["metric"] == "pooled-cosine" and validation["passed"]
    assert validation["metrics"]["compared_positions"] == int(np.load(evaluation)["attention_mask"].sum())
    model = onnx.load(str(version / "model.onnx"))
    dynamic_ops = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert any(n.op_type in dynamic_ops for n in model.graph.node)
    assert "INT8 mode: dynamic" in (version / "report.md").read_text()


def test_dynamic_int8_for_tensorrt_is_refused_with_the_reason(encoder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    evaluation = _save(tmp_path / "eval.npz", _tokens(8, 12, seed=1))
    flags = ["--int8-mode", "dynamic", "--target", "tensorrt", "--eval", str(evaluation)]
    code = _build(encoder, tmp_path / "repo", *flags)
    assert code == 2
    err = capsys.readouterr().err
    assert "TensorRT has no dynamic quantization" in err and "--int8-mode static" in err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_attention_mask_that_is_not_0_1_is_refused(encoder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tokens = _tokens(8, 12, seed=1)
    tokens["attention_mask"][3, 2] = 2
    evaluation = _save(tmp_path / "eval.npz", tokens)
    assert _build(encoder, tmp_path / "repo", "--int8-mode", "dynamic", "--eval", str(evaluation)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'attention_mask' holds 2 at sample 3, position 2" in err and "must be 0 (padding) or 1" in err


def test_static_int8_with_calibration_of_varying_sequence_lengths(encoder: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib"
    data.mkdir()
    _save(data / "short.npz", _tokens(12, 8, seed=2))
    _save(data / "long.npz", _tokens(12, 16, seed=3))
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    _save(evaluation / "a.npz", _tokens(6, 8, seed=4))
    _save(evaluation / "b.npz", _tokens(6, 16, seed=5))
    code = _build(encoder, tmp_path / "repo", "--calib", str(data), "--eval", str(evaluation), "--skip-gate",
                  "--calib-cache", str(tmp_path / "cache"))  # fmt: skip
    assert code == 0
    manifest = json.loads((tmp_path / "repo" / "bert-int8-ort" / "1" / "kiln.json").read_text())
    metrics = manifest["validation"]["metrics"]
    assert manifest["validation"]["metric"] == "pooled-cosine"
    assert 0 < metrics["pooled_cosine"] <= 1.0 + 1e-9
    assert manifest["calibration"]["samples"] == 24 and manifest["calibration"]["batch_size"] >= 1


def test_pooled_cosine_without_a_sequence_axis_says_what_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from builders.examples import example_data_path, example_model_path

    argv = ["build", str(example_model_path()), "--name", "digits", "--repo", str(tmp_path / "repo"), "--precision",
            "int8", "--calib", str(example_data_path()), "--metric", "pooled-cosine",
            "--calib-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    assert "use --metric cosine" in " ".join(capsys.readouterr().err.split())


def test_auto_tries_smoothquant_and_dynamic_int8_on_an_encoder(encoder: Path, tmp_path: Path) -> None:
    calib = _save(tmp_path / "calib.npz", _tokens(24, 12, seed=6))
    evaluation = _save(tmp_path / "eval.npz", _tokens(16, 12, seed=7))
    argv = ["build", str(encoder), "--name", "bert", "--repo", str(tmp_path / "repo"), "--precision", "auto",
            "--calib", str(calib), "--eval", str(evaluation), "--max-accuracy-drop", "0.02",
            "--calib-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    version = tmp_path / "repo" / "bert-auto-ort" / "1"
    manifest = json.loads((version / "kiln.json").read_text())
    auto = manifest["build"]["auto"]
    rows = {row["candidate"]: row for row in auto["candidates"]}
    labels = list(rows)
    assert auto["transformer"] and labels[0] == "int8" and labels[-2:] == ["fp16", "fp32"]
    assert labels[1].startswith("int8 smoothquant (alpha ") and labels[2].startswith("int8 dynamic")
    assert [rows[label]["method"] for label in labels[:3]] == ["static", "smoothquant", "dynamic"]
    smooth_row = rows[labels[1]]
    assert smooth_row["metric"] == "pooled-cosine" and smooth_row["seconds"] > 0
    chosen = rows[auto["chosen"]]
    passing = [r for r in auto["candidates"] if r["passed"]]
    assert chosen["passed"] and _fastest_or_safest_tie(passing) is chosen
    assert manifest["build"]["selected_precision"] == chosen["precision"]
    if chosen["method"] == "smoothquant":
        assert manifest["build"]["quantization"]["method"] == "smoothquant"
    report = (version / "report.md").read_text()
    assert f"auto chose: {auto['chosen']} ({chosen['method']}): the fastest of {len(passing)}" in report
    assert "int8 smoothquant" in (version / "tradeoff.md").read_text()


def test_smoothquant_static_int8_searches_alpha_and_keeps_attention_float(encoder: Path, tmp_path: Path) -> None:
    calib = _save(tmp_path / "calib.npz", _tokens(24, 12, seed=8))
    evaluation = _save(tmp_path / "eval.npz", _tokens(16, 12, seed=9))
    # a zero budget: the attention-score MatMuls may not go int8 (the gate itself is skipped)
    code = _build(encoder, tmp_path / "repo", "--smoothquant", "--calib", str(calib), "--eval", str(evaluation),
                  "--skip-gate", "--max-accuracy-drop", "0", "--calib-cache", str(tmp_path / "cache"))  # fmt: skip
    assert code == 0
    version = tmp_path / "repo" / "bert-int8-ort" / "1"
    manifest = json.loads((version / "kiln.json").read_text())
    quant = manifest["build"]["quantization"]
    assert quant["method"] == "smoothquant" and quant["alpha"] in (0.5, 0.65, 0.8, 0.9)
    assert [r["alpha"] for r in quant["alpha_search"]] == [0.5, 0.65, 0.8, 0.9]
    assert sum(r["chosen"] for r in quant["alpha_search"]) == 1
    assert quant["attention_int8"]["tried"] and not quant["attention_int8"]["kept"]
    # 2 layers x (Q/K/V share one input, attention output, FFN in, FFN out) = 8 weight-layer inputs
    assert quant["quantized_activations"] == 8 and quant["smoothed_activations"] == 8
    assert manifest["validation"]["metric"] == "pooled-cosine"
    assert manifest["validation"]["metrics"]["pooled_cosine"] > 0.98
    model = onnx.load(str(version / "model.onnx"))
    consumers = {n.output[0]: n for n in model.graph.node}
    quantized_into = {n.op_type for n in model.graph.node if any(i.endswith("_dequantized") for i in n.input)}
    assert quantized_into == {"MatMul"}
    scores = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(("/scores", "/context"))]
    assert len(scores) == 4 and not any(i.endswith("_dequantized") for n in scores for i in n.input)
    assert sum(n.op_type == "QuantizeLinear" for n in consumers.values()) == 8
    assert "SmoothQuant alpha" in (version / "report.md").read_text()


def test_smoothquant_is_refused_for_tensorrt_and_dynamic(encoder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    calib = _save(tmp_path / "calib.npz", _tokens(8, 12, seed=1))
    assert _build(encoder, tmp_path / "repo", "--smoothquant", "--target", "tensorrt", "--calib", str(calib)) == 2
    assert "--smoothquant applies to --precision int8 --target ort" in " ".join(capsys.readouterr().err.split())
    assert _build(encoder, tmp_path / "repo", "--smoothquant", "--int8-mode", "dynamic", "--eval", str(calib)) == 2
    assert "--smoothquant is a static INT8 method" in " ".join(capsys.readouterr().err.split())


def test_smoothquant_puts_attention_matmuls_in_int8_within_the_budget(encoder: Path, tmp_path: Path) -> None:
    calib = _save(tmp_path / "calib.npz", _tokens(24, 12, seed=8))
    evaluation = _save(tmp_path / "eval.npz", _tokens(16, 12, seed=9))
    code = _build(encoder, tmp_path / "repo", "--smoothquant", "--calib", str(calib), "--eval", str(evaluation),
                  "--max-accuracy-drop", "0.05", "--calib-cache", str(tmp_path / "cache"))  # fmt: skip
    assert code == 0
    version = tmp_path / "repo" / "bert-int8-ort" / "1"
    quant = json.loads((version / "kiln.json").read_text())["build"]["quantization"]
    assert quant["attention_int8"]["kept"] and quant["attention_int8"]["drop"] <= 0.05
    assert quant["quantized_activations"] == 16  # + per layer: Q heads, K heads, probabilities, V heads
    model = onnx.load(str(version / "model.onnx"))
    scores = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(("/scores", "/context"))]
    assert len(scores) == 4 and all(i.endswith("_dequantized") for n in scores for i in n.input[:2])
    assert "attention score/context MatMuls in int8" in (version / "report.md").read_text()


def _fastest_or_safest_tie(passing: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate auto must publish: the last one whose max-batch speedup is within SPEED_TIE of the best."""
    best = max(r["speedup_max_batch"] for r in passing)
    return [r for r in passing if r["speedup_max_batch"] >= best * (1 - SPEED_TIE)][-1]
