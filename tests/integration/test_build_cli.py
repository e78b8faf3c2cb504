"""`kiln build|inspect|repo` end to end through main(argv) on the real example model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from harness.models import make_linear_model, tree_snapshot
from server.cli import main

pytestmark = pytest.mark.integration


def _run(example_data: Path, artifact: Path, source: Path) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(example_data)["input"][:64]
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return ref, got


def test_build_fp32_and_fp16_match_source(tmp_path: Path, example_model: Path, example_data: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert main(["build", str(example_model), "--name", "digits", "--precision", "fp32", "--repo", str(repo)]) == 0
    assert "published digits-fp32-ort version 1" in capsys.readouterr().out
    assert (
        main(
            [
                "build",
                str(example_model),
                "--name",
                "digits",
                "--precision",
                "fp16",
                "--repo",
                str(repo),
                "--max-batch",
                "8",
                "--instances",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FP16 on a CPU target is for size, not speed" in out
    ref, got32 = _run(example_data, repo / "digits-fp32-ort/1/model.onnx", example_model)
    np.testing.assert_allclose(got32, ref, rtol=1e-4, atol=1e-4)
    ref, got16 = _run(example_data, repo / "digits-fp16-ort/1/model.onnx", example_model)
    np.testing.assert_allclose(got16, ref, rtol=2e-2, atol=2e-2)
    assert (got16.argmax(1) == ref.argmax(1)).mean() >= 0.99
    fp16 = onnx.load(str(repo / "digits-fp16-ort/1/model.onnx"))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 I/O kept
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    size16 = (repo / "digits-fp16-ort/1/model.onnx").stat().st_size
    assert size16 < 0.6 * (repo / "digits-fp32-ort/1/model.onnx").stat().st_size
    config = (repo / "digits-fp16-ort/config.pbtxt").read_text()
    assert "max_batch_size: 8" in config and "count: 2" in config
    assert main(["repo", "verify", "--repo", str(repo)]) == 0
    assert main(["repo", "list", "--repo", str(repo), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out.split("OK ", 1)[-1].split("\n", 1)[-1])
    assert {m["model"]: m["versions"] for m in listing} == {"digits-fp16-ort": [1], "digits-fp32-ort": [1]}
    assert main(["repo", "show", "digits-fp16-ort", "--repo", str(repo)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["versions"]["1"]["precision"] == "fp16"
    assert shown["config"]["platform"] == "onnxruntime_onnx"


def test_inspect_json(example_model: Path, capsys) -> None:
    assert main(["inspect", str(example_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert info["outputs"][0]["shape"] == ["batch", 10]
    assert info["opset"] == 17
    assert info["op_histogram"]["Conv"] == 3
    assert info["parameter_count"] > 10_000
    assert info["external_data_files"] == []
    assert info["weights_in_constant_nodes"] == 0
    assert main(["inspect", str(example_model)]) == 0
    assert "batch, 1, 8, 8" in capsys.readouterr().out


def test_inspect_reports_external_data_and_constant_weights(tmp_path: Path, capsys) -> None:
    src = make_linear_model(tmp_path / "lin.onnx", in_features=64, out_features=32)
    model = onnx.load(str(src))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert main(["inspect", str(tmp_path / "ext.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external_data_files"] == ["ext.bin"]
    # missing external data -> one clear error
    os.remove(tmp_path / "ext.bin")
    assert main(["inspect", str(tmp_path / "ext.onnx")]) == 2
    assert "external data file(s) ['ext.bin'] that are missing" in capsys.readouterr().err


BAD_MODELS = {
    "not_onnx": (b"hello, I am a text file\n", "not a readable ONNX model"),
    "truncated": (None, "not a readable ONNX model"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_bad_model_files(tmp_path: Path, example_model: Path, kind: str, capsys) -> None:
    data, message = BAD_MODELS[kind]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data if data is not None else example_model.read_bytes()[:5000])
    repo = tmp_path / "repo"
    assert main(["build", str(bad), "--name", "m", "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not repo.exists()


def test_model_without_inputs(tmp_path: Path, capsys) -> None:
    from onnx import TensorProto, helper, numpy_helper

    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(3, np.float32)))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    onnx.save(helper.make_model(graph), str(tmp_path / "noin.onnx"))
    assert main(["build", str(tmp_path / "noin.onnx"), "--name", "m", "--repo", str(tmp_path / "r")]) == 2
    assert "has no inputs" in capsys.readouterr().err


def test_missing_model_file(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 3
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--target", "tpu"], "unknown target 'tpu'"),
        (["--name", "../x"], "model name '../x' is not allowed"),
        (["--name", "a/b"], "model name 'a/b' is not allowed"),
        (["--name", ""], "model name '' is not allowed"),
        (["--name", "x" * 300], "is not allowed"),
        (["--instances", "0"], "--instances must be >= 1"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ],
)
def test_bad_arguments_leave_repository_untouched(
    tmp_path: Path, example_model: Path, args: list[str], message: str, capsys
) -> None:
    repo = tmp_path / "repo"
    assert main(["build", str(example_model), "--name", "digits", "--repo", str(repo)]) == 0
    before = tree_snapshot(repo)
    argv = ["build", str(example_model), "--name", "digits", "--repo", str(repo), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree_snapshot(repo) == before


def test_repo_is_a_file_or_unwritable(tmp_path: Path, example_model: Path, capsys) -> None:
    file_repo = tmp_path / "file"
    file_repo.write_text("x")
    assert main(["build", str(example_model), "--name", "d", "--repo", str(file_repo)]) == 4
    assert "is a file" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits; use a path under a file instead
            target = file_repo / "sub"
        else:
            target = locked
        code = main(["build", str(example_model), "--name", "d", "--repo", str(target)])
        assert code == 4
        assert "check --repo" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert file_repo.read_text() == "x"


def test_repo_verify_fails_with_exit_code(tmp_path: Path, example_model: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert main(["build", str(example_model), "--name", "digits", "--repo", str(repo)]) == 0
    (repo / "digits-fp32-ort/1/model.onnx").write_bytes(b"broken")
    assert main(["repo", "verify", "--repo", str(repo)]) == 4
    captured = capsys.readouterr()
    assert "FAIL digits-fp32-ort/1: file 'model.onnx' checksum" in captured.out
    assert "failed verification" in captured.err
    shutil.rmtree(repo)
    assert main(["repo", "list", "--repo", str(repo)]) == 3
