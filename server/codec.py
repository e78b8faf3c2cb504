"""KServe v2 tensors on the wire <-> numpy arrays.

Inputs come as ``raw_input_contents`` (one little-endian buffer per input, in input order) or as
typed ``contents``; BYTES elements are 4-byte little-endian length-prefixed, like Triton. Outputs
always go out as ``raw_output_contents``.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from builders.tensors import kserve_dtype, numpy_dtype_from_kserve
from core.errors import InvalidInputError

MAX_DIMS = 64  # numpy's (and so ONNX Runtime's Python API's) limit
MAX_ELEMENTS = 2**40

_TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name, checked for datatype, shape and byte size."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInputError(f"input {tensor.name!r} appears twice in the request; send it once")
        shape = _checked_shape(tensor.name, tensor.shape)
        dtype = _dtype(tensor.name, tensor.datatype)
        if raw:
            arrays[tensor.name] = _from_raw(tensor.name, tensor.datatype, dtype, shape, raw[index])
        else:
            arrays[tensor.name] = _from_typed(tensor, dtype, shape)
    return arrays


def _checked_shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    """The shape of an input if it can describe a real tensor: at most 64 dims, none negative, and
    (zero dims aside) not more elements than any message could carry."""
    if len(dims) > MAX_DIMS:
        raise InvalidInputError(
            f"input {name!r} has {len(dims)} dims ({_shown(dims)}); at most {MAX_DIMS} are supported"
        )
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r} has shape {_shown(shape)}; dims must be >= 0")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidInputError(
            f"input {name!r} has shape {_shown(shape)}: even with its zero dims left out that is more than "
            f"2**{MAX_ELEMENTS.bit_length() - 1} elements, which no request can carry; send the tensor's real shape"
        )
    return shape


def _shown(shape: Sequence[int]) -> str:
    """A shape for a message: the first dims of a long one only."""
    dims = [str(int(d)) for d in shape[:8]]
    return "[" + ",".join(dims) + (",...]" if len(shape) > 8 else "]")


def encode_outputs(
    response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], names: Sequence[str] | None = None
) -> None:
    """Append each output's (of ``names``, default all) metadata and raw little-endian bytes to ``response``."""
    tensors, raw = response.outputs, response.raw_output_contents
    for name in outputs if names is None else names:
        arr = outputs[name]
        tensors.add(name=name, datatype=_wire_name(arr.dtype), shape=arr.shape)
        raw.append(to_raw(arr))


def to_raw(arr: np.ndarray) -> bytes:
    """The wire bytes of an array (BYTES: length-prefixed elements)."""
    if arr.dtype.kind == "O":
        return b"".join(struct.pack("<I", len(b)) + b for b in (_as_bytes(x) for x in arr.reshape(-1)))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()  # C order, whatever the array's layout


@functools.lru_cache(maxsize=32)
def _wire_name(dtype: np.dtype) -> str:
    return kserve_dtype("object" if dtype.kind == "O" else dtype.name)


def _dtype(name: str, datatype: str) -> np.dtype:
    try:
        return _wire_numpy_dtype(datatype)
    except ValueError as err:
        raise InvalidInputError(f"input {name!r} has unknown datatype {datatype!r}; use a KServe v2 datatype") from err


@functools.lru_cache(maxsize=32)
def _wire_numpy_dtype(datatype: str) -> np.dtype:
    """Little-endian numpy dtype of a KServe v2 datatype (object for BYTES)."""
    dtype = numpy_dtype_from_kserve(datatype)
    return dtype if dtype.kind == "O" else dtype.newbyteorder("<")


def _from_raw(name: str, datatype: str, dtype: np.dtype, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    count = math.prod(shape)
    if dtype.kind == "O":
        return _bytes_elements(name, data, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"input {name!r} has {len(data)} bytes of raw data; shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _bytes_elements(name: str, data: bytes, count: int) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidInputError(f"input {name!r}: BYTES data ends inside a 4-byte length prefix at {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(items)} claims {length} bytes, only {len(data) - offset} remain"
            )
        items.append(bytes(data[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInputError(f"input {name!r} has {len(items)} BYTES elements; its shape needs {count}")
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr


def _from_typed(tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    field = _TYPED_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(
            f"input {tensor.name!r} of datatype {tensor.datatype} has no typed contents in KServe v2; "
            "send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"input {tensor.name!r} has {len(values)} elements in contents.{field}; shape {list(shape)} needs {count}"
        )
    if dtype.kind == "O":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
