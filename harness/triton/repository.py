"""Write a Triton model directory that serves an ONNX file through Triton's Python backend.

Layout (a real Triton 2.51 loads it unchanged)::

    <repo>/<name>/config.pbtxt        backend "python", inputs/outputs read from the ONNX
    <repo>/<name>/1/model.py          server/testing/triton_python_model.py
    <repo>/<name>/1/model.onnx        the ONNX (and its external data files, if any)

``config.pbtxt`` is built as a ``ModelConfig`` protobuf and written with ``text_format``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builders.inspection import external_data_files, graph_inputs, load_model, value_spec
from builders.model_config import add_tensors
from builders.tensors import TensorSpec
from core.errors import InvalidInputError, NotFoundError
from harness.triton import python_model as triton_python_model

VERSION = "1"


def write_python_backend_model(
    repo: Path,
    name: str,
    onnx_path: Path,
    max_batch_size: int,
    dynamic_batching: bool,
    *,
    max_queue_delay_us: int = 0,
    instance_count: int = 1,
    intra_op_threads: int = 0,
) -> Path:
    """Write ``<repo>/<name>`` serving ``onnx_path`` with ONNX Runtime in the Python backend.

    ``max_batch_size`` > 0 makes the first ONNX axis (which must be dynamic) Triton's batch axis;
    ``dynamic_batching`` then lets Triton gather requests for up to ``max_queue_delay_us``.
    ``intra_op_threads`` 0 keeps ONNX Runtime's default. Returns the model directory.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise NotFoundError(f"ONNX model {str(onnx_path)!r} does not exist; build it first")
    if max_batch_size < 0 or instance_count < 1 or intra_op_threads < 0 or max_queue_delay_us < 0:
        raise InvalidInputError(
            f"max_batch_size={max_batch_size}, instance_count={instance_count}, "
            f"intra_op_threads={intra_op_threads}, max_queue_delay_us={max_queue_delay_us}: "
            "use max_batch_size >= 0, instance_count >= 1 and non-negative threads and delay"
        )
    model = load_model(onnx_path, load_external_data=False)
    inputs = tuple(value_spec(v) for v in graph_inputs(model))
    outputs = tuple(value_spec(v) for v in model.graph.output)
    config = python_backend_config(name, inputs, outputs, max_batch_size, dynamic_batching)
    if dynamic_batching and max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.add(count=instance_count, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.parameters["intra_op_threads"].string_value = str(intra_op_threads)

    model_dir = Path(repo) / name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(triton_python_model.__file__, version_dir / "model.py")
    shutil.copyfile(onnx_path, version_dir / triton_python_model.MODEL_FILENAME)
    for data_file in external_data_files(model):
        shutil.copyfile(onnx_path.parent / data_file, version_dir / data_file)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return model_dir


def add_python_backend_version(model_dir: Path, version: int, onnx_path: Path) -> Path:
    """Add version ``version`` serving ``onnx_path`` to a model written by ``write_python_backend_model``.

    The files are staged in a hidden directory and renamed into place, so a polling Triton never
    sees half a version. Returns the version directory.
    """
    model_dir = Path(model_dir)
    if version < 1 or (model_dir / str(version)).exists():
        raise InvalidInputError(f"version {version} of {str(model_dir)!r} exists or is not >= 1; pick a new one")
    stage = model_dir / f".stage-{version}"
    stage.mkdir()
    shutil.copyfile(triton_python_model.__file__, stage / "model.py")
    shutil.copyfile(onnx_path, stage / triton_python_model.MODEL_FILENAME)
    return stage.rename(model_dir / str(version))


def python_backend_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    max_batch_size: int,
    dynamic_batching: bool,
) -> mc.ModelConfig:
    """The ModelConfig (without instance group) of a Python-backend model with these tensors."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    batched = max_batch_size > 0
    if batched:
        for spec in inputs + outputs:
            _check_batch_axis(spec, max_batch_size)
    add_tensors(config, inputs, outputs)
    if batched and dynamic_batching:
        config.dynamic_batching.SetInParent()
    return config


def _check_batch_axis(spec: TensorSpec, max_batch_size: int) -> None:
    if not spec.numeric_shape:
        raise InvalidInputError(
            f"tensor {spec.name!r} has no dimensions (scalar or unknown shape); use max_batch_size=0"
        )
    first = spec.numeric_shape[0]
    if first != -1:
        raise InvalidInputError(
            f"tensor {spec.name!r} has a fixed first axis {first} but max_batch_size={max_batch_size}; "
            "export the model with a dynamic batch axis or use max_batch_size=0"
        )
