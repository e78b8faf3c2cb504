"""Tensor descriptions shared by every step: names, dtypes, shapes with dynamic axes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

# ONNX element type -> (numpy dtype name, Triton data type name)
_ONNX_TYPES: dict[int, tuple[str, str]] = {
    TensorProto.FLOAT: ("float32", "TYPE_FP32"),
    TensorProto.FLOAT16: ("float16", "TYPE_FP16"),
    TensorProto.DOUBLE: ("float64", "TYPE_FP64"),
    TensorProto.BFLOAT16: ("bfloat16", "TYPE_BF16"),
    TensorProto.INT8: ("int8", "TYPE_INT8"),
    TensorProto.INT16: ("int16", "TYPE_INT16"),
    TensorProto.INT32: ("int32", "TYPE_INT32"),
    TensorProto.INT64: ("int64", "TYPE_INT64"),
    TensorProto.UINT8: ("uint8", "TYPE_UINT8"),
    TensorProto.UINT16: ("uint16", "TYPE_UINT16"),
    TensorProto.UINT32: ("uint32", "TYPE_UINT32"),
    TensorProto.UINT64: ("uint64", "TYPE_UINT64"),
    TensorProto.BOOL: ("bool", "TYPE_BOOL"),
    TensorProto.STRING: ("object", "TYPE_STRING"),
}

# KServe v2 datatype names (used on the wire) per numpy dtype name
_KSERVE_TYPES: dict[str, str] = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "bfloat16": "BF16",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
    "object": "BYTES",
}

Dim = int | str  # an int >= 0, -1 for unknown, or a symbolic name


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. Dynamic axes are symbolic names (str) or -1."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"; "object" for strings
    shape: tuple[Dim, ...]

    @property
    def triton_dtype(self) -> str:
        """Triton config data type, e.g. ``TYPE_FP32``."""
        for np_name, triton_name in _ONNX_TYPES.values():
            if np_name == self.dtype:
                return triton_name
        raise ValueError(f"dtype {self.dtype!r} has no Triton equivalent")

    @property
    def kserve_dtype(self) -> str:
        """KServe v2 wire data type, e.g. ``FP32``."""
        return kserve_dtype(self.dtype)

    @property
    def numeric_shape(self) -> tuple[int, ...]:
        """Shape with every dynamic axis as -1 (Triton's convention)."""
        return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in self.shape)

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def onnx_elem_to_numpy(elem_type: int) -> str:
    """Numpy dtype name for an ONNX element type."""
    try:
        return _ONNX_TYPES[elem_type][0]
    except KeyError:
        raise ValueError(f"ONNX element type {elem_type} is not supported") from None


def kserve_dtype(np_dtype: str) -> str:
    """KServe v2 datatype (``FP32``) for a numpy dtype name (``float32``)."""
    try:
        return _KSERVE_TYPES[np_dtype]
    except KeyError:
        raise ValueError(f"dtype {np_dtype!r} has no KServe v2 equivalent") from None


def numpy_dtype_from_kserve(name: str) -> np.dtype:
    """Numpy dtype for a KServe v2 datatype name (``FP32`` -> float32, ``BYTES`` -> object)."""
    for np_name, k_name in _KSERVE_TYPES.items():
        if k_name == name:
            return np.dtype(np_name) if np_name != "bfloat16" else np.dtype("uint16")
    raise ValueError(f"unknown KServe v2 datatype {name!r}")


def triton_to_numpy(triton_type: str) -> str:
    """Numpy dtype name for a Triton config type (``TYPE_FP32`` -> ``float32``)."""
    for np_name, t_name in _ONNX_TYPES.values():
        if t_name == triton_type:
            return np_name
    raise ValueError(f"unknown Triton data type {triton_type!r}")
