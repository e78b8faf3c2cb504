"""Kiln's bundled example: a small CNN trained on scikit-learn's handwritten digits.

The files live in ``builders/data/`` (shipped as package data) and are made by
``examples/digits/train.py``:

* ``digits.onnx``: input ``input`` float32 [batch,1,8,8], output ``logits`` float32 [batch,10].
* ``digits_heldout.npz``: the held-out split, ``input`` float32 [M,1,8,8], ``labels`` int64 [M].
* ``digits.json``: held-out accuracy (measured with ONNX Runtime), split, seed, tool versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import InvalidInputError, NotFoundError

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_FILE = "digits.onnx"
DATA_FILE = "digits_heldout.npz"
METADATA_FILE = "digits.json"


def _bundled(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise NotFoundError(
            f"example file {str(path)!r} is missing; reinstall kiln-serve with its package "
            "data, or regenerate it with 'python examples/digits/train.py'"
        )
    return path


def example_model_path() -> Path:
    """Path of the example ONNX model (``digits.onnx``)."""
    return _bundled(MODEL_FILE)


def example_data_path() -> Path:
    """Path of the example's held-out data (``digits_heldout.npz``: ``input``, ``labels``)."""
    return _bundled(DATA_FILE)


def example_metadata() -> dict[str, Any]:
    """The example's recorded metadata (``digits.json``), e.g. ``held_out_accuracy``."""
    path = _bundled(METADATA_FILE)
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInputError(
            f"example metadata {str(path)!r} is unreadable ({err}); regenerate it with "
            "'python examples/digits/train.py'"
        ) from err
    if not isinstance(metadata, dict):
        raise InvalidInputError(
            f"example metadata {str(path)!r} holds a {type(metadata).__name__}, expected a "
            "JSON object; regenerate it with 'python examples/digits/train.py'"
        )
    return metadata


TINY_DECODER_FILE = "tiny_decoder.onnx"


def tiny_decoder_path() -> Path:
    """Path of the tiny random-weight llama-style decoder with KV cache (byte tokenizer, context 256),
    written by ``examples/llm/export_tiny_decoder.py``."""
    return _bundled(TINY_DECODER_FILE)
