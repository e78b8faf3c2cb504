"""Step 1 of a build: load and check an ONNX model and describe it.

``load_model`` turns every way a model file can be broken into one InvalidInputError that names
the problem; ``describe_model`` reports what later steps and users need to know.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from builders.tensors import Dim, TensorSpec, onnx_elem_to_numpy
from core.errors import InvalidInputError, NotFoundError


@dataclass(frozen=True)
class ModelInfo:
    """What ``kiln inspect`` reports about a model."""

    path: str
    sha256: str
    ir_version: int
    opset: int
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameter_count: int
    parameter_bytes: int
    op_histogram: dict[str, int]
    external_data_files: tuple[str, ...]
    weights_in_initializers: int
    weights_in_constant_nodes: int
    batch_axis_dynamic: bool = field(default=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [_spec_dict(s) for s in self.inputs]
        data["outputs"] = [_spec_dict(s) for s in self.outputs]
        return data


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: Path | str, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model, raising one clear error for each way it can be broken."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"model file {str(path)!r} does not exist; pass the path of an .onnx file")
    if path.is_dir():
        raise InvalidInputError(f"model path {str(path)!r} is a directory; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise InvalidInputError(
            f"{str(path)!r} is not a readable ONNX model (protobuf decode failed: {err}); "
            "is it truncated or a different file type?"
        ) from err
    if not model.graph.node and not model.graph.input and not model.graph.output:
        raise InvalidInputError(
            f"{str(path)!r} parsed as an empty ONNX model (no graph); it is probably not an ONNX file"
        )
    folder = path.parent.resolve()
    outside = [f for f in external_data_files(model) if not (folder / f).resolve().is_relative_to(folder)]
    if outside:
        raise InvalidInputError(
            f"model {str(path)!r} names external data file(s) {outside} outside its folder {str(path.parent)!r}; "
            "ONNX requires them beside the model (or below it): move them and fix the locations"
        )
    missing = [f for f in external_data_files(model) if not (path.parent / f).exists()]
    if missing:
        raise InvalidInputError(
            f"model {str(path)!r} stores weights in external data file(s) {missing} that are missing; "
            f"put them next to the model in {str(path.parent)!r}"
        )
    if load_external_data and external_data_files(model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (ValueError, OSError, onnx.checker.ValidationError) as err:
            raise InvalidInputError(
                f"model {str(path)!r}: external data file(s) {external_data_files(model)} do not hold the weights "
                f"it names ({err}); they are truncated or belong to another model"
            ) from err
    _check(model, path)
    return model


def _check(model: onnx.ModelProto, path: Path) -> None:
    if not graph_inputs(model):
        raise InvalidInputError(f"model {str(path)!r} has no inputs; Kiln can only serve models that take inputs")
    if not model.graph.output:
        raise InvalidInputError(f"model {str(path)!r} has no outputs")
    try:
        # path-based check handles models over 2 GB and external data
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        text = " ".join(str(err).split()) or repr(err)  # the checker spreads one finding over lines
        shown = text if len(text) <= 400 else text[:397] + "..."
        raise InvalidInputError(
            f"model {str(path)!r} fails onnx.checker: {shown}; fix the graph or re-export the model"
        ) from err


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of ``graph`` that read it, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (old exporters list both)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """Distinct external data file names referenced by initializers."""
    files: list[str] = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location" and entry.value not in files:
                    files.append(entry.value)
    return files


def value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """TensorSpec of a graph input/output; unknown dims become -1, symbolic ones keep their name."""
    ttype = value.type.tensor_type
    dims: list[Dim] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(-1)
    try:
        dtype = onnx_elem_to_numpy(ttype.elem_type)
    except ValueError as err:
        raise InvalidInputError(f"tensor {value.name!r}: {err}") from err
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def describe_model(model: onnx.ModelProto, path: Path | str) -> ModelInfo:
    """Everything ``kiln inspect`` prints; the model must come from ``load_model``."""
    path = Path(path)
    inputs = tuple(value_spec(v) for v in graph_inputs(model))
    outputs = tuple(value_spec(v) for v in model.graph.output)
    params = 0
    nbytes = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        params += int(arr.size)
        nbytes += int(arr.nbytes)
    constant_weights = 0
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    arr = numpy_helper.to_array(attr.t)
                    if arr.size > 1:
                        constant_weights += 1
                        params += int(arr.size)
                        nbytes += int(arr.nbytes)
    histogram = Counter(node.op_type for node in _all_nodes(model.graph))
    return ModelInfo(
        path=str(path),
        sha256=file_sha256(path),
        ir_version=int(model.ir_version),
        opset=model_opset(model),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=inputs,
        outputs=outputs,
        parameter_count=params,
        parameter_bytes=nbytes,
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        external_data_files=tuple(_external_files_on_disk(model, path)),
        weights_in_initializers=sum(1 for i in model.graph.initializer if np.prod(i.dims) > 1),
        weights_in_constant_nodes=constant_weights,
        batch_axis_dynamic=bool(inputs) and all(_dynamic_first_axis(s) for s in inputs),
    )


def _external_files_on_disk(model: onnx.ModelProto, path: Path) -> list[str]:
    """External data files as stored (loading external data rewrites the in-memory locations)."""
    files = external_data_files(model)
    if not files and path.exists():
        files = external_data_files(onnx.load(str(path), load_external_data=False))
    return files


def _dynamic_first_axis(spec: TensorSpec) -> bool:
    return bool(spec.shape) and not (isinstance(spec.shape[0], int) and spec.shape[0] >= 0)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    nodes.extend(_all_nodes(sub))
    return nodes


def max_batch_size(info: ModelInfo, requested: int | None) -> int:
    """Triton max_batch_size: 0 when the model has no dynamic leading batch axis."""
    if not info.batch_axis_dynamic:
        if requested:
            raise InvalidInputError(
                f"--max-batch {requested} given, but model inputs "
                f"{[s.describe() for s in info.inputs]} have no dynamic leading batch axis; "
                "omit --max-batch or export the model with a dynamic batch dimension"
            )
        return 0
    if requested is not None and requested < 1:
        raise InvalidInputError(f"--max-batch must be >= 1, got {requested}")
    return requested if requested is not None else 32
