"""Checks of one inference request against a model's declared inputs and outputs.

Every message names the model and tensor and shows got vs expected, e.g.
``input 'input' has shape [1,3,8,8]; model 'digits-fp32-ort' expects [-1,1,8,8]``.
"""

from __future__ import annotations

import functools

import numpy as np

from builders.tensors import TensorSpec, kserve_dtype
from core.errors import InvalidInputError


def check_inputs(
    model: str,
    specs: tuple[TensorSpec, ...],
    output_names: tuple[str, ...],
    max_batch_size: int,
    inputs: dict[str, np.ndarray],
    requested: tuple[str, ...],
) -> None:
    """Raise InvalidInputError for the first problem: names, dtypes, shapes, batch size, outputs."""
    declared = {s.name: s for s in specs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InvalidInputError(f"model {model!r} has no input {unknown[0]!r}; its inputs are {sorted(declared)}")
    missing = sorted(set(declared) - set(inputs))
    if missing:
        raise InvalidInputError(f"input {missing[0]!r} of model {model!r} is missing; send all of {sorted(declared)}")
    for name, arr in inputs.items():
        _check_tensor(model, declared[name], arr)
    if max_batch_size > 0:
        _check_batch(model, max_batch_size, inputs)
    bad = [n for n in requested if n not in output_names]
    if bad:
        raise InvalidInputError(f"model {model!r} has no output {bad[0]!r}; its outputs are {sorted(output_names)}")


def _check_tensor(model: str, spec: TensorSpec, arr: np.ndarray) -> None:
    if arr.dtype != _numpy_dtype(spec.dtype):
        got, want = _wire_dtype(arr.dtype), spec.kserve_dtype
        raise InvalidInputError(f"input {spec.name!r} has datatype {got}; model {model!r} expects {want}")
    expected = _expected_shape(spec)
    if len(arr.shape) != len(expected) or any(e != -1 and e != g for g, e in zip(arr.shape, expected, strict=True)):
        raise InvalidInputError(
            f"input {spec.name!r} has shape {_dims(arr.shape)}; model {model!r} expects {_dims(expected)}"
        )


@functools.lru_cache(maxsize=256)
def _expected_shape(spec: TensorSpec) -> tuple[int, ...]:
    return spec.numeric_shape


@functools.lru_cache(maxsize=64)
def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def _check_batch(model: str, max_batch_size: int, inputs: dict[str, np.ndarray]) -> None:
    sizes = {name: int(arr.shape[0]) for name, arr in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidInputError(f"inputs of model {model!r} disagree on the batch size (first axis): {sizes}")
    size = next(iter(sizes.values()), 0)
    if size < 1 or size > max_batch_size:
        raise InvalidInputError(
            f"batch size {size} is outside 1..{max_batch_size} (max_batch_size of model {model!r}); split the request"
        )


def _wire_dtype(dtype: np.dtype) -> str:
    try:
        return kserve_dtype("object" if dtype.kind == "O" else dtype.name)
    except ValueError:
        return dtype.name


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
