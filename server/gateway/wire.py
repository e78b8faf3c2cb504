"""Protobuf wire-format surgery on serialized KServe v2 messages, without decoding tensors.

Protobuf parsers keep the LAST value of a repeated-on-the-wire scalar field, so overriding
``model_name`` (field 1) and ``model_version`` (field 2) of a ModelInferRequest is an append of two
short fields to the request bytes; the tensors are never touched. Reading the model name walks the
top-level fields only, jumping over length-delimited payloads (tensors) without copying them.
"""

from __future__ import annotations

from core.errors import InvalidInputError

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string_field(field: int, value: str) -> bytes:
    """Bytes of one length-delimited field (tag, length, UTF-8 payload)."""
    payload = value.encode("utf-8")
    return encode_varint((field << 3) | _WIRE_LEN) + encode_varint(len(payload)) + payload


def name_version_suffix(name: str, version: str) -> bytes:
    """What to append so a message's field 1 reads ``name`` and field 2 reads ``version``."""
    return encode_string_field(1, name) + encode_string_field(2, version)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise InvalidInputError("request bytes end inside a varint; the message is truncated")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidInputError("request bytes hold a varint longer than 10 bytes; not protobuf")


def _truncated() -> InvalidInputError:
    return InvalidInputError("request bytes end inside a field; the message is truncated")


def _spans(data: bytes, field: int, second: int = 0) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Spans of the last top-level length-delimited ``field`` (and ``second``, if not 0) in ``data``.

    Every length and skip is bounds-checked, so no input reads past the end: hostile bytes get an
    InvalidInputError saying what is wrong, never an IndexError.
    """
    pos, end = 0, len(data)
    tag_a, tag_b = (field << 3) | _WIRE_LEN, (second << 3) | _WIRE_LEN if second else -1
    found_a = found_b = None
    while pos < end:
        if data[pos] < 0x80:  # one-byte tag, the common case
            tag = data[pos]
            pos += 1
        else:
            tag, pos = _varint(data, pos)
        wire = tag & 7
        if tag < 8:
            raise InvalidInputError("request bytes use protobuf field number 0, which is invalid; not protobuf")
        if wire == _WIRE_LEN:
            if pos >= end:
                raise _truncated()
            if data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = _varint(data, pos)
            if pos + length > end:
                raise _truncated()
            if tag == tag_a:
                found_a = (pos, pos + length)
            elif tag == tag_b:
                found_b = (pos, pos + length)
            pos += length
        elif wire == _WIRE_VARINT:
            _, pos = _varint(data, pos)
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        else:
            raise InvalidInputError(f"request bytes use protobuf wire type {wire}, which KServe v2 never uses")
    if pos != end:
        raise _truncated()
    return found_a, found_b


def _text(data: bytes, span: tuple[int, int] | None, field: int) -> str:
    if span is None:
        return ""
    try:
        return data[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"field {field} of the request is not UTF-8 text") from err


def read_string_field(data: bytes, field: int) -> str:
    """The last value of top-level string ``field`` in serialized ``data`` ("" when absent)."""
    return _text(data, _spans(data, field)[0], field)


def read_model_name(data: bytes) -> str:
    """``model_name`` (field 1) of a serialized ModelInferRequest or Model*Request."""
    return read_string_field(data, 1)


def read_name_version(data: bytes) -> tuple[str, str]:
    """(``model_name``, ``model_version``): fields 1 and 2, in one walk over the top-level fields."""
    name, version = _spans(data, 1, 2)
    return _text(data, name, 1), _text(data, version, 2)
