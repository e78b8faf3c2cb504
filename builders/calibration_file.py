"""Calibration results on disk: Kiln's ``calibration.json`` and TensorRT's calibration cache.

``calibration.json`` holds the per-tensor amax and what produced it (method, bins, sample count,
data and model hashes, Kiln version) so a later build reuses it when nothing changed.

The TensorRT cache is TensorRT's own text format, as written by its calibrators::

    TRT-100300-EntropyCalibration2
    input: 3c010a14
    /conv1/Conv_output_0: 3d0b7086

The header carries ``NV_TENSORRT_VERSION`` (``major*10000 + minor*100 + patch`` from TensorRT
10, ``major*1000 + minor*100 + patch`` before, e.g. ``8601``) and the calibration algorithm;
each line is a tensor name and the big-endian IEEE float32 bits of its scale ``amax / 127`` in
lowercase hex without leading zeros (a zero scale is ``0``); every line, the last included, ends
with a newline and entries keep their order. Reading keeps the scale bits exactly (amax is
``float32 scale * 127`` in float64, which is exact), so a cache read and written back is
byte-identical.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import builders
from core.atomic_file import write_atomic
from core.errors import InvalidInputError, NotFoundError

FORMAT = "kiln-calibration"
FORMAT_VERSION = 1
INT8_MAX = 127
DEFAULT_TRT_VERSION = "10.3.0"
TRT_ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration")
_ALGORITHM_METHOD = {
    "EntropyCalibration2": "entropy",
    "EntropyCalibration": "entropy",
    "MinMaxCalibration": "minmax",
}
_HEADER = re.compile(r"TRT-(\d+)-(\w+)")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CalibrationTable:
    """Per-tensor amax (symmetric int8 range ``[-amax, amax]``) and its provenance.

    ``None`` in ``data_sha256``/``model_sha256``/``num_samples``/``num_bins`` means unknown (a
    table read from a TensorRT cache); such a table never matches for reuse.
    ``trt_version``/``trt_algorithm`` are the cache header fields to write (and those read).
    """

    amax: Mapping[str, float]
    method: str
    num_bins: int | None = None
    num_samples: int | None = None
    data_sha256: str | None = None
    model_sha256: str | None = None
    kiln_version: str = builders.__version__
    method_params: Mapping[str, float] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    trt_version: str | None = None
    trt_algorithm: str = "EntropyCalibration2"

    def __post_init__(self) -> None:
        for name, value in self.amax.items():
            _check_name(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"amax of tensor {name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"amax of tensor {name!r} is {value!r}; it must be finite and >= 0")
        for key, param in self.method_params.items():
            if isinstance(param, bool) or not isinstance(param, int | float) or not math.isfinite(param):
                raise InvalidInputError(f"method parameter {key!r} must be finite, got {param!r}")
        both = sorted(set(self.amax) & set(self.skipped))
        if both:
            raise InvalidInputError(f"tensors {both} are both calibrated and skipped")
        for key in ("data_sha256", "model_sha256"):
            digest = getattr(self, key)
            if digest is not None and not _SHA256.fullmatch(digest):
                raise InvalidInputError(f"{key} must be 64 lowercase hex digits, got {digest!r}")
        if self.trt_algorithm not in TRT_ALGORITHMS:
            raise InvalidInputError(
                f"TensorRT calibration algorithm {self.trt_algorithm!r} is not one of {', '.join(TRT_ALGORITHMS)}"
            )

    def scale(self, name: str) -> float:
        """The float32 scale ``amax / 127`` of a tensor (what Q/DQ nodes and the cache use)."""
        if name not in self.amax:
            raise NotFoundError(f"tensor {name!r} has no calibrated amax in this table")
        return float(scale_of(self.amax[name]))

    def matches(self, *, model_sha256: str, data_sha256: str, method: str) -> bool:
        """Whether this table can be reused for that model, data and method."""
        return self.model_sha256 == model_sha256 and self.data_sha256 == data_sha256 and self.method == method

    # -------------------------------------------------------------- calibration.json
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kiln_version": self.kiln_version,
            "method": self.method,
            "method_params": dict(self.method_params),
            "num_bins": self.num_bins,
            "num_samples": self.num_samples,
            "data_sha256": self.data_sha256,
            "model_sha256": self.model_sha256,
            "trt_version": self.trt_version,
            "trt_algorithm": self.trt_algorithm,
            "amax": {name: float(value) for name, value in self.amax.items()},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: object, source: str = "calibration table") -> CalibrationTable:
        """Validate and build a table from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(
                f"{source} is not a {FORMAT} v{FORMAT_VERSION} file (format="
                f"{data.get('format')!r}, format_version={data.get('format_version')!r}); "
                "recreate it with 'kiln calib' or a fresh build"
            )
        get = _Fields(data, source)
        return cls(
            amax=get.mapping("amax", (int, float)),
            method=get.typed("method", str),
            num_bins=get.optional("num_bins", int),
            num_samples=get.optional("num_samples", int),
            data_sha256=get.optional("data_sha256", str),
            model_sha256=get.optional("model_sha256", str),
            kiln_version=get.typed("kiln_version", str),
            method_params=get.mapping("method_params", (int, float)),
            skipped=get.mapping("skipped", (str,)),
            trt_version=get.optional("trt_version", str),
            trt_algorithm=get.typed("trt_algorithm", str),
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write ``calibration.json`` atomically (temp file in the same folder, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        _write_atomic(Path(path), text.encode("utf-8"))

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> CalibrationTable:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise NotFoundError(f"calibration file {source!r} does not exist") from err
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"calibration file {source!r} is unreadable: {err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"calibration file {source!r} is not valid JSON ({err}); recreate it") from err
        return cls.from_dict(data, source=f"calibration file {source!r}")


class _Fields:
    """Typed access to a parsed JSON object, raising InvalidInputError naming the field."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self._data = data
        self._source = source

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise InvalidInputError(f"{self._source} lacks the field {key!r}")
        return self._data[key]

    def _fail(self, key: str, expected: str, value: object) -> InvalidInputError:
        return InvalidInputError(f"{self._source}: field {key!r} must be {expected}, got {value!r}")

    def typed(self, key: str, kind: type) -> Any:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self._fail(key, kind.__name__, value)
        return value

    def optional(self, key: str, kind: type) -> Any:
        value = self._get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise self._fail(key, f"{kind.__name__} or null", value)
        return value

    def mapping(self, key: str, kinds: tuple[type, ...]) -> dict[str, Any]:
        value = self._get(key)
        names = " or ".join(kind.__name__ for kind in kinds)
        if not isinstance(value, dict):
            raise self._fail(key, f"an object of {names}", value)
        for item in value.values():
            if isinstance(item, bool) or not isinstance(item, kinds):
                raise self._fail(key, f"an object of {names}", value)
        return dict(value)


# ------------------------------------------------------------------ TensorRT calibration cache
def scale_of(amax: float) -> np.float32:
    """The float32 scale of a symmetric int8 range: ``float32(amax / 127)``."""
    return np.float32(float(amax) / INT8_MAX)


def encode_trt_version(version: str) -> str:
    """``"10.3.0"`` -> ``"100300"``, ``"8.6.1"`` -> ``"8601"``; an all-digit string is kept."""
    if version.isdigit():
        return version
    parts = version.split(".")
    if not 1 <= len(parts) <= 4 or not all(part.isdigit() for part in parts):
        raise InvalidInputError(
            f"TensorRT version {version!r} is not like '10.3.0' or '8.6.1' (or '100300'); pass tensorrt.__version__"
        )
    major, minor, patch = (int(part) for part in [*parts, "0", "0"][:3])
    if minor > 99 or patch > 99:
        raise InvalidInputError(f"TensorRT version {version!r} has a component above 99")
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def to_trt_cache(table: CalibrationTable, trt_version: str | None = None) -> bytes:
    """TensorRT calibration cache bytes for ``table`` (see the module docstring).

    ``trt_version`` is the TensorRT that will read it (``tensorrt.__version__``; TensorRT refuses
    a cache whose header names another version); by default the table's own (from a cache it
    was read from), else :data:`DEFAULT_TRT_VERSION`.
    """
    version = encode_trt_version(trt_version or table.trt_version or DEFAULT_TRT_VERSION)
    lines = [f"TRT-{version}-{table.trt_algorithm}\n"]
    for name, amax in table.amax.items():
        _check_name(name)
        bits = struct.unpack(">I", struct.pack(">f", scale_of(amax)))[0]
        lines.append(f"{name}: {bits:x}\n")
    return "".join(lines).encode("utf-8")


def from_trt_cache(data: bytes, kiln_version: str = builders.__version__) -> CalibrationTable:
    """Parse TensorRT calibration cache bytes into a table (amax = float32 scale * 127)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(
            f"TensorRT calibration cache is not text ({err}); is it a binary cache from another tool?"
        ) from err
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    if not lines:
        raise InvalidInputError("TensorRT calibration cache is empty")
    version, algorithm = _parse_header(lines[0])
    amax: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        name, scale = _parse_entry(line, number)
        if name in amax:
            raise InvalidInputError(f"TensorRT calibration cache line {number}: tensor {name!r} appears twice")
        amax[name] = float(scale) * INT8_MAX
    return CalibrationTable(
        amax=amax,
        method=_ALGORITHM_METHOD[algorithm],
        kiln_version=kiln_version,
        trt_version=version,
        trt_algorithm=algorithm,
    )


def _parse_header(line: str) -> tuple[str, str]:
    match = _HEADER.fullmatch(line)
    if match is None:
        raise InvalidInputError(
            f"TensorRT calibration cache header {line[:80]!r} is not like 'TRT-100300-EntropyCalibration2'"
        )
    version, algorithm = match.groups()
    if algorithm not in TRT_ALGORITHMS:
        raise InvalidInputError(
            f"TensorRT calibration cache uses algorithm {algorithm!r}; Kiln reads {', '.join(TRT_ALGORITHMS)}"
        )
    return version, algorithm


def _parse_entry(line: str, number: int) -> tuple[str, np.float32]:
    name, sep, hex_bits = line.rpartition(": ")
    if not sep or not name:
        raise InvalidInputError(f"TensorRT calibration cache line {number} {line[:80]!r} is not 'name: hexscale'")
    if not _HEX.fullmatch(hex_bits):
        raise InvalidInputError(
            f"TensorRT calibration cache line {number}: scale {hex_bits[:20]!r} of tensor "
            f"{name!r} is not 1-8 hex digits (float32 bits of amax/127)"
        )
    scale = np.frombuffer(int(hex_bits, 16).to_bytes(4, "big"), dtype=">f4")[0]
    if not np.isfinite(scale) or scale < 0:
        raise InvalidInputError(
            f"TensorRT calibration cache line {number}: tensor {name!r} has scale {scale} "
            f"(0x{hex_bits}); a scale must be finite and >= 0"
        )
    return name, np.float32(scale)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
        raise InvalidInputError(f"tensor name {name!r} cannot be stored: it must be a non-empty single-line string")


def write_trt_cache(path: str | os.PathLike[str], data: bytes) -> None:
    """Write cache bytes (from :func:`to_trt_cache`) atomically."""
    _write_atomic(Path(path), data)


def read_trt_cache(path: str | os.PathLike[str]) -> CalibrationTable:
    """Read a TensorRT calibration cache file into a table."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError(f"TensorRT calibration cache {str(path)!r} does not exist") from err
    except OSError as err:
        raise InvalidInputError(f"TensorRT calibration cache {str(path)!r}: {err}") from err
    return from_trt_cache(data)


def _write_atomic(path: Path, payload: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
    except OSError as err:
        raise InvalidInputError(f"cannot write {str(path)!r}: {err}; choose a writable folder") from err
