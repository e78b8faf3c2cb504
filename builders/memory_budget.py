"""How many samples fit in one calibration or validation batch under a memory budget.

Calibration makes every quantizable activation a graph output, so one batch of B samples holds
``B x (activation bytes per sample)`` at once, plus ONNX Runtime's own working buffers while it
runs. The bytes per sample come from ONNX shape inference with the data's own sample shapes
(batch 1); tensors whose shapes inference cannot resolve are counted from a one-sample probe run
instead (``measured_footprint``). ``batch_for_budget`` turns that into a batch size, and refuses,
naming the largest tensor, a budget that cannot hold even one sample.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from builders.tensors import onnx_elem_to_numpy
from core.errors import InvalidInputError, ResourceExhaustedError

logger = logging.getLogger(__name__)

DEFAULT_CALIB_MEMORY = 1 << 30  # 1 GiB
# A run keeps the fetched outputs and, while it runs, ONNX Runtime's working buffers (at most about
# as much again); histogram updates work on fixed 1 M-element chunks.
OVERHEAD = 2.0
MAX_BATCH = 256
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}  # fmt: skip


@dataclass(frozen=True)
class Footprint:
    """Activation bytes one sample needs, the largest tensor, and tensors of unknown size."""

    per_sample: int
    largest: tuple[str, int] = ("", 0)
    unknown: tuple[str, ...] = ()


def parse_memory(text: str | int) -> int:
    """Bytes from ``1GiB``, ``512M``, ``800MB``, ``1073741824`` (binary units; B optional)."""
    if isinstance(text, int):
        value = text
    else:
        raw = str(text).strip().lower().replace(" ", "")
        digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = raw[len(digits) :]
        try:
            value = int(float(digits) * _UNITS[unit])
        except (ValueError, KeyError):
            raise InvalidInputError(
                f"--calib-memory {text!r} is not a size; use e.g. 1GiB, 512MiB or a number of bytes"
            ) from None
    if value < 1 << 20:
        raise InvalidInputError(f"--calib-memory must be at least 1 MiB, got {value} bytes")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def estimated_footprint(
    model: onnx.ModelProto, tensors: Iterable[str], sample_shapes: Mapping[str, tuple[int, ...]]
) -> Footprint:
    """Bytes per sample of ``tensors`` by shape inference with batch 1 and ``sample_shapes``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        shape = sample_shapes.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if shape is None or len(dims) != len(shape) + 1:
            continue
        for dim, size in zip(dims, (1, *shape), strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as err:  # inference raises several untyped errors on odd graphs
        logger.info("shape inference for the memory budget failed (%s); measuring instead", err)
        inferred = probe
    values = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    per_tensor: dict[str, int] = {}
    unknown: list[str] = []
    for name in tensors:
        value = values.get(name)
        found = _bytes(value) if value is not None else None
        if found is not None:
            per_tensor[name] = found
        else:
            unknown.append(name)
    return _footprint(per_tensor, unknown)


def measured_footprint(outputs: Mapping[str, np.ndarray], batch: int) -> Footprint:
    """Bytes per sample of the arrays one run of ``batch`` samples fetched."""
    per_tensor = {n: int(a.nbytes) // max(1, batch) for n, a in outputs.items() if isinstance(a, np.ndarray)}
    return _footprint(per_tensor, [])


def batch_for_budget(footprint: Footprint, budget: int, *, cap: int = MAX_BATCH, what: str = "calibration") -> int:
    """The largest batch whose activations fit ``budget``; ResourceExhaustedError if one sample does not."""
    need = footprint.per_sample * OVERHEAD
    if need > budget:
        name, size = footprint.largest
        raise ResourceExhaustedError(
            f"--calib-memory {format_bytes(budget)} cannot hold one {what} sample: its activations need "
            f"{format_bytes(footprint.per_sample)} (x{OVERHEAD:g} while ONNX Runtime runs), the largest being "
            f"tensor {name!r} at {format_bytes(size)}; raise --calib-memory to at least {format_bytes(need)}"
        )
    if footprint.per_sample <= 0:
        return cap
    return max(1, min(cap, int(budget // need)))


def validation_batch(bytes_per_sample: int, budget: int, cap: int = 64) -> int:
    """Samples per validation run: what ``budget`` holds of the calibrated activations, at most ``cap``.

    A validation session keeps fewer tensors alive than calibration fetches, so this is on the safe
    side; unknown bytes (0) leave ``cap``.
    """
    if bytes_per_sample <= 0:
        return cap
    return max(1, min(cap, int(budget // (bytes_per_sample * OVERHEAD))))


def _footprint(per_tensor: Mapping[str, int], unknown: list[str]) -> Footprint:
    largest = max(per_tensor.items(), key=lambda kv: kv[1], default=("", 0))
    return Footprint(sum(per_tensor.values()), largest, tuple(unknown))


def _bytes(value: onnx.ValueInfoProto) -> int | None:
    ttype = value.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    dims = []
    for dim in ttype.shape.dim:
        if not dim.HasField("dim_value") or dim.dim_value < 0:
            return None
        dims.append(dim.dim_value)
    try:
        itemsize = np.dtype(onnx_elem_to_numpy(ttype.elem_type)).itemsize
    except (ValueError, TypeError, KeyError):
        return None
    return int(np.prod(dims, dtype=np.int64)) * itemsize
