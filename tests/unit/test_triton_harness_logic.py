"""Pure logic of the real-Triton harness: environment, command line, model config, batch stacking."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from builders.tensors import TensorSpec
from core.errors import InvalidInputError, MissingDependencyError, NotFoundError
from harness.triton.cli import (
    TritonInstall,
    ensure_triton_venv,
    main,
    python_backend_config,
    triton_env,
    write_python_backend_model,
)
from harness.triton.process import _choose_ports, triton_args
from harness.triton.python_model import _stackable


def fake_install(root: Path) -> TritonInstall:
    return TritonInstall(
        venv=root / "venv",
        tritonserver=root / "bin" / "tritonserver",
        backends_dir=root / "backends",
        libs_dir=root / "libs",
        python_libdir=root / "pylib",
        cache_dir=root / "caches",
        versions={"python": "3.11"},
    )


def test_env_puts_the_venv_first_and_drops_foreign_python_settings(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "PYTHONHOME": "/x", "LD_LIBRARY_PATH": "/opt/lib", "A": "1"}
    env = triton_env(install, base)
    assert env["PATH"].split(":")[0] == str(install.venv / "bin")
    assert env["LD_LIBRARY_PATH"].split(":") == [str(install.python_libdir), str(install.libs_dir), "/opt/lib"]
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env
    assert env["VIRTUAL_ENV"] == str(install.venv) and env["PYTHONNOUSERSITE"] == "1" and env["A"] == "1"


def test_args_bind_loopback_only_and_load_models_explicitly(tmp_path: Path) -> None:
    args = triton_args(fake_install(tmp_path), tmp_path / "repo", (8001, 8002, None), ["a", "b"])
    assert "--grpc-address=127.0.0.1" in args and "--http-address=127.0.0.1" in args
    assert "--grpc-port=8001" in args and "--http-port=8002" in args
    assert "--allow-metrics=false" in args
    assert f"--backend-directory={tmp_path / 'backends'}" in args
    assert args[-3:] == ["--model-control-mode=explicit", "--load-model=a", "--load-model=b"]
    with_metrics = triton_args(fake_install(tmp_path), tmp_path, (1, 2, 9000), ["a"])
    assert "--metrics-port=9000" in with_metrics and "--metrics-address=127.0.0.1" in with_metrics


def test_config_drops_the_batch_axis_and_sets_dynamic_batching() -> None:
    inputs = (TensorSpec("x", "float32", ("batch", 3, 4)),)
    outputs = (TensorSpec("y", "int64", (-1, 2)),)
    config = python_backend_config("m", inputs, outputs, max_batch_size=8, dynamic_batching=True)
    assert config.backend == "python" and config.max_batch_size == 8
    assert list(config.input[0].dims) == [3, 4] and config.input[0].data_type == mc.TYPE_FP32
    assert list(config.output[0].dims) == [2] and config.output[0].data_type == mc.TYPE_INT64
    assert config.HasField("dynamic_batching")
    unbatched = python_backend_config("m", inputs, outputs, max_batch_size=0, dynamic_batching=True)
    assert list(unbatched.input[0].dims) == [-1, 3, 4] and not unbatched.HasField("dynamic_batching")


def test_config_refuses_batching_a_fixed_first_axis() -> None:
    inputs = (TensorSpec("x", "float32", (1, 3)),)
    with pytest.raises(InvalidInputError, match=r"'x' has a fixed first axis 1 but max_batch_size=4"):
        python_backend_config("m", inputs, (), max_batch_size=4, dynamic_batching=False)


def test_stacking_needs_equal_inputs_beyond_the_batch_axis() -> None:
    a = {"x": np.zeros((2, 3), np.float32)}
    assert _stackable([a, {"x": np.zeros((5, 3), np.float32)}])
    assert not _stackable([a, {"x": np.zeros((2, 4), np.float32)}])
    assert not _stackable([a, {"x": np.zeros((2, 3), np.float64)}])
    assert not _stackable([a, {"y": np.zeros((2, 3), np.float32)}])


def test_write_model_lays_out_config_model_py_and_onnx(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
    )
    source = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    model_dir = write_python_backend_model(
        tmp_path / "repo", "ident", source, 4, dynamic_batching=True, max_queue_delay_us=250, instance_count=2
    )
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == "ident" and config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (model_dir / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert "class TritonPythonModel" in (model_dir / "1" / "model.py").read_text()


def test_write_model_names_a_missing_onnx(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope.onnx"):
        write_python_backend_model(tmp_path / "repo", "m", tmp_path / "nope.onnx", 0, dynamic_batching=False)


def test_setup_never_deletes_a_directory_that_is_not_a_venv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="exists and is not a venv"):
        ensure_triton_venv(tmp_path)
    assert main(["--setup", str(tmp_path)]) == 2
    assert "is not a venv" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_setup_names_an_unsupported_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(MissingDependencyError, match="riscv64"):
        ensure_triton_venv(tmp_path / "venv")
    assert not (tmp_path / "venv").exists()


def test_zero_ports_become_distinct_free_ports_and_given_ones_stay() -> None:
    grpc, http, metrics = _choose_ports(0, 0, 0)
    assert metrics is not None and len({grpc, http, metrics}) == 3 and min(grpc, http, metrics) > 0
    assert _choose_ports(5001, 0, None)[0] == 5001 and _choose_ports(5001, 0, None)[2] is None
