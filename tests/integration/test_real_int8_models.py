"""INT8 on the real pretrained models of harness/real_models.py (skipped when they were not fetched)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builders.validate import SPEED_TIE
from harness.real_models import available
from server.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _need(key: str):  # type: ignore[no-untyped-def]
    model = available(key)
    if model is None:
        pytest.skip(f"real model {key!r} not fetched (offline?); run `python harness/real_models.py fetch`")
    return model


def test_minilm_dynamic_int8_keeps_pooled_cosine_on_real_text(tmp_path: Path) -> None:
    model = _need("minilm")
    held = {k: v[:24] for k, v in np.load(model.heldout).items()}
    np.savez(tmp_path / "eval.npz", **held)
    argv = ["build", str(model.onnx), "--name", "minilm", "--repo", str(tmp_path / "repo"), "--precision", "int8",
            "--int8-mode", "dynamic", "--eval", str(tmp_path / "eval.npz"), "--allow-slower"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "repo" / "minilm-int8-ort" / "1" / "kiln.json").read_text())
    metrics = manifest["validation"]["metrics"]
    assert manifest["validation"]["metric"] == "pooled-cosine" and metrics["pooled_cosine"] >= 0.99
    assert metrics["compared_positions"] == int(held["attention_mask"].sum())  # padding never compared


def test_minilm_smoothquant_static_int8_keeps_pooled_cosine_on_real_text(tmp_path: Path) -> None:
    model = _need("minilm")
    np.savez(tmp_path / "calib.npz", **{k: v[:48] for k, v in np.load(model.calib).items()})
    np.savez(tmp_path / "eval.npz", **{k: v[:32] for k, v in np.load(model.heldout).items()})
    argv = ["build", str(model.onnx), "--name", "minilm", "--repo", str(tmp_path / "repo"), "--precision", "int8",
            "--smoothquant", "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
            "--allow-slower", "--calib-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "repo" / "minilm-int8-ort" / "1" / "kiln.json").read_text())
    assert manifest["build"]["quantization"]["method"] == "smoothquant"
    assert manifest["validation"]["metrics"]["pooled_cosine"] >= 0.995


def test_minilm_auto_tries_smoothquant_and_publishes_the_fastest_within_a_strict_budget(tmp_path: Path) -> None:
    model = _need("minilm")
    np.savez(tmp_path / "calib.npz", **{k: v[:48] for k, v in np.load(model.calib).items()})
    np.savez(tmp_path / "eval.npz", **{k: v[:32] for k, v in np.load(model.heldout).items()})
    argv = ["build", str(model.onnx), "--name", "minilm", "--repo", str(tmp_path / "repo"), "--precision", "auto",
            "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--calib-method", "minmax",
            "--metric", "pooled-cosine", "--max-accuracy-drop", "0.005", "--max-batch", "8",
            "--calib-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "repo" / "minilm-auto-ort" / "1" / "kiln.json").read_text())
    auto = manifest["build"]["auto"]
    rows = {r["candidate"]: r for r in auto["candidates"]}
    assert auto["transformer"] and not rows["int8"]["passed"]  # plain static INT8 of an encoder: far off
    smooth = next(r for label, r in rows.items() if label.startswith("int8 smoothquant"))
    assert smooth["passed"] and smooth["value"] >= 0.995
    assert any(r["method"] == "dynamic" for r in rows.values())
    chosen = rows[auto["chosen"]]
    passing = [r for r in auto["candidates"] if r["passed"]]
    assert chosen["passed"] and _fastest_or_safest_tie(passing) is chosen
    assert manifest["validation"]["metrics"]["pooled_cosine"] >= 0.995


def test_resnet_calibration_batches_follow_the_memory_budget(tmp_path: Path) -> None:
    model = _need("resnet")
    calib = {k: v[:6] for k, v in np.load(model.calib).items()}
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "eval.npz", **{k: v[:4] for k, v in np.load(model.heldout).items()})
    argv = ["build", str(model.onnx), "--name", "resnet", "--repo", str(tmp_path / "repo"), "--precision", "int8",
            "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--calib-method", "minmax",
            "--calib-memory", "256MiB", "--allow-slower", "--skip-gate"]  # fmt: skip
    assert main(argv) == 0
    calibration = json.loads((tmp_path / "repo" / "resnet-int8-ort" / "1" / "kiln.json").read_text())["calibration"]
    per_sample = calibration["activation_bytes_per_sample"]
    assert per_sample > 40 << 20  # ResNet-50 at 224x224: ~56 MB of activations per image
    assert calibration["batch_size"] == (256 << 20) // (2 * per_sample)
    tight = [*argv[:-4], "--calib-memory", "64MiB", "--calib-cache", str(tmp_path / "fresh")]
    assert main(tight) == 9  # below one sample (x2 while ONNX Runtime runs): refused before any run


def _fastest_or_safest_tie(passing: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate auto must publish: the last one whose max-batch speedup is within SPEED_TIE of the best."""
    best = max(r["speedup_max_batch"] for r in passing)
    return [r for r in passing if r["speedup_max_batch"] >= best * (1 - SPEED_TIE)][-1]


def test_mobile_plain_int8_keeps_depthwise_float_and_stays_close(tmp_path: Path) -> None:
    """PP-LCNet: with its 13 depthwise convs in int8 top-1 agreement was 0.68; plain INT8 measures that
    and keeps them float (their weights stay float in the artifact), >= 0.90 agreement."""
    model = _need("mobile")
    np.savez(tmp_path / "calib.npz", **{k: v[:64] for k, v in np.load(model.calib).items()})
    np.savez(tmp_path / "eval.npz", **{k: v[:128] for k, v in np.load(model.heldout).items()})
    argv = ["build", str(model.onnx), "--name", "mobile", "--repo", str(tmp_path / "repo"), "--precision", "int8",
            "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--allow-slower",
            "--skip-gate", "--calib-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    version = tmp_path / "repo" / "mobile-int8-ort" / "1"
    manifest = json.loads((version / "kiln.json").read_text())
    rows = manifest["build"]["quantization"]["calibration_choice"]
    chosen = next(r for r in rows if r.get("chosen"))
    assert chosen["float_depthwise"] == 13
    assert all(r["drop"] > chosen["drop"] for r in rows if not r["float_depthwise"])  # int8 depthwise: measured worse
    assert manifest["validation"]["metrics"]["top1_agreement"] >= 0.90
    artifact = onnx.load(str(version / "model.onnx"))
    inits = {i.name for i in artifact.graph.initializer}
    depthwise = [n for n in artifact.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                                for a in n.attribute)]  # fmt: skip
    assert len(depthwise) == 13 and all(n.input[1] in inits for n in depthwise)
