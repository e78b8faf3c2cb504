"""calibration.json and TensorRT calibration cache: round trips and malformed input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from builders.calibration_file import (
    CalibrationTable,
    encode_trt_version,
    from_trt_cache,
    read_trt_cache,
    scale_of,
    to_trt_cache,
    write_trt_cache,
)
from core.errors import InvalidInputError, NotFoundError

# Shaped like caches TensorRT 10 writes: unordered names, names with ':' and spaces, a zero
# scale written as '0' (hex without leading zeros), a newline after every line.
TRT_CACHE = (
    b"TRT-101000-EntropyCalibration2\n"
    b"input: 3e30f86c\n"
    b"/encoder/layers.0/Add_output_0: 3f143af7\n"
    b"ONNXTRT_Broadcast_1855_output: 0\n"
    b"(Unnamed Layer* 4) [Fully Connected]_output: 3d65992f\n"
    b"input_1:0: 3c010a14\n"
    b"/cls_head/MatMul_output_0: 3dcd5191\n"
)
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def _table(**changes: object) -> CalibrationTable:
    fields: dict[str, object] = {
        "amax": {"input": 1.0, "/conv1/Conv_output_0": 3.25, "relu": 0.1},
        "method": "entropy",
        "num_bins": 2048,
        "num_samples": 360,
        "data_sha256": SHA_A,
        "model_sha256": SHA_B,
        "method_params": {"num_quantized_bins": 128, "start_bin": 128},
        "skipped": {"mask": "non-finite values: 3 of 9 values are NaN or inf"},
    }
    fields.update(changes)
    return CalibrationTable(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ TensorRT cache
def test_trt_cache_round_trip_is_byte_exact() -> None:
    table = from_trt_cache(TRT_CACHE)
    assert list(table.amax) == [
        "input",
        "/encoder/layers.0/Add_output_0",
        "ONNXTRT_Broadcast_1855_output",
        "(Unnamed Layer* 4) [Fully Connected]_output",
        "input_1:0",
        "/cls_head/MatMul_output_0",
    ]
    assert table.amax["ONNXTRT_Broadcast_1855_output"] == 0.0
    assert table.amax["input_1:0"] == struct.unpack(">f", bytes.fromhex("3c010a14"))[0] * 127
    assert (table.trt_version, table.trt_algorithm, table.method) == ("101000", "EntropyCalibration2", "entropy")
    assert to_trt_cache(table) == TRT_CACHE


def test_trt_cache_round_trip_through_calibration_json(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    from_trt_cache(TRT_CACHE).write_json(path)
    assert to_trt_cache(CalibrationTable.read_json(path)) == TRT_CACHE
    cache_path = tmp_path / "calib.cache"
    write_trt_cache(cache_path, TRT_CACHE)
    assert to_trt_cache(read_trt_cache(cache_path)) == TRT_CACHE


def test_every_float32_scale_survives_the_round_trip() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7F800000, size=5000, dtype=np.uint32)  # finite, >= 0, incl. subnormal
    bits[:4] = [0, 1, 0x007FFFFF, 0x7F7FFFFF]
    lines = "".join(f"t{i}: {b:x}\n" for i, b in enumerate(bits.tolist()))
    cache = f"TRT-8601-MinMaxCalibration\n{lines}".encode()
    table = from_trt_cache(cache)
    assert table.method == "minmax"
    assert to_trt_cache(table) == cache
    json_again = CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert to_trt_cache(json_again) == cache


def test_table_to_cache_uses_float32_of_amax_over_127() -> None:
    table = _table()
    cache = to_trt_cache(table, trt_version="10.3.0").decode()
    lines = cache.split("\n")
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert cache.endswith("\n") and lines[-1] == ""
    name, hex_bits = lines[2].rsplit(": ", 1)
    assert name == "/conv1/Conv_output_0"
    assert hex_bits == struct.pack(">f", 3.25 / 127).hex()
    assert "mask" not in cache  # skipped tensors stay in float: no scale
    again = from_trt_cache(cache.encode())
    for key, amax in table.amax.items():
        assert again.amax[key] == pytest.approx(amax, rel=2**-23)
        assert again.scale(key) == float(scale_of(amax))
    assert to_trt_cache(again) == cache.encode()


@pytest.mark.parametrize(
    ("version", "encoded"),
    [("10.3.0", "100300"), ("10.10", "101000"), ("8.6.1", "8601"), ("7.1.3.4", "7103"), ("100900", "100900")],
)
def test_trt_version_encoding(version: str, encoded: str) -> None:
    assert encode_trt_version(version) == encoded
    assert to_trt_cache(_table(), trt_version=version).startswith(f"TRT-{encoded}-".encode())


@pytest.mark.parametrize("version", ["10.x", "", "ten", "10.100.0", "1.2.3.4.5"])
def test_bad_trt_versions_are_rejected(version: str) -> None:
    with pytest.raises(InvalidInputError, match="TensorRT version"):
        encode_trt_version(version)


def test_lenient_reading_of_hand_edited_caches() -> None:
    table = from_trt_cache(b"TRT-8600-EntropyCalibration2\r\na: 3C010A14\r\nb: 00000000")
    assert table.amax["a"] == pytest.approx(1.00024, rel=1e-5) and table.amax["b"] == 0.0
    assert to_trt_cache(table) == b"TRT-8600-EntropyCalibration2\na: 3c010a14\nb: 0\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xff\xfe binary", "not text"),
        (b"calibration\nx: 3f800000\n", "header"),
        (b"TRT-8601-LegacyCalibration\nx: 3f800000\n", "algorithm 'LegacyCalibration'"),
        (b"TRT-8601-EntropyCalibration2\nx 3f800000\n", "line 2"),
        (b"TRT-8601-EntropyCalibration2\n: 3f800000\n", "not 'name: hexscale'"),
        (b"TRT-8601-EntropyCalibration2\nx: 3f80000g\n", "hex digits"),
        (b"TRT-8601-EntropyCalibration2\nx: 13f800000\n", "hex digits"),
        (b"TRT-8601-EntropyCalibration2\nx: 7fc00000\n", "finite and >= 0"),
        (b"TRT-8601-EntropyCalibration2\nx: 7f800000\n", "finite and >= 0"),
        (b"TRT-8601-EntropyCalibration2\nx: bf800000\n", "finite and >= 0"),
        (b"TRT-8601-EntropyCalibration2\nx: 3f800000\n\nx: 3f800000\n", "line 3"),
        (b"TRT-8601-EntropyCalibration2\nx: 3f800000\nx: 3f800000\n", "appears twice"),
    ],
)
def test_malformed_caches_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        from_trt_cache(data)


def test_missing_cache_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        read_trt_cache(tmp_path / "nope.cache")


# ------------------------------------------------------------------ calibration.json
def test_json_round_trip_keeps_everything(tmp_path: Path) -> None:
    table = _table(amax={"a": 0.1 + 0.2, "b": 1e-30, "c": 123456.789})
    path = tmp_path / "sub" / "calibration.json"
    table.write_json(path)
    again = CalibrationTable.read_json(path)
    assert again == table
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["format"] == "kiln-calibration" and data["amax"]["a"] == 0.1 + 0.2
    assert again.matches(model_sha256=SHA_B, data_sha256=SHA_A, method="entropy")
    assert not again.matches(model_sha256=SHA_B, data_sha256=SHA_A, method="minmax")
    assert not from_trt_cache(TRT_CACHE).matches(model_sha256=SHA_B, data_sha256=SHA_A, method="entropy")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not a kiln-calibration v1"),
        ({"format_version": 2}, "not a kiln-calibration v1"),
        ({"method": 3}, "'method' must be str"),
        ({"num_bins": "2048"}, "'num_bins' must be int or null"),
        ({"amax": [1.0]}, "'amax' must be an object"),
        ({"amax": {"x": "1.0"}}, "'amax' must be an object"),
        ({"amax": {"x": -1.0}}, "finite and >= 0"),
        ({"amax": {"x": float("nan")}}, "finite and >= 0"),
        ({"amax": {"mask": 1.0}}, "both calibrated and skipped"),
        ({"data_sha256": "abc"}, "64 lowercase hex"),
        ({"skipped": {"x": 1}}, "'skipped' must be an object"),
        ({"trt_algorithm": "Legacy"}, "not one of"),
    ],
)
def test_malformed_json_is_rejected(tmp_path: Path, change: dict[str, object], message: str) -> None:
    data = {**_table().to_dict(), **change}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match=message):
        CalibrationTable.read_json(path)


def test_json_missing_field_and_non_json(tmp_path: Path) -> None:
    data = _table().to_dict()
    del data["model_sha256"]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match="lacks the field 'model_sha256'"):
        CalibrationTable.read_json(path)
    path.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        CalibrationTable.read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="JSON object"):
        CalibrationTable.read_json(path)
    with pytest.raises(NotFoundError, match="does not exist"):
        CalibrationTable.read_json(tmp_path / "missing.json")


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="cannot write"):
        _table().write_json(blocker / "calibration.json")


def test_bad_names_cannot_be_stored() -> None:
    with pytest.raises(InvalidInputError, match="single-line"):
        _table(amax={"a\nb": 1.0})
    with pytest.raises(NotFoundError, match="no calibrated amax"):
        _table().scale("missing")
