"""The real-model harness: its ONNX writer of the MiniLM encoder and its safetensors reader (offline)."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest

from harness.real_models import available, minilm_onnx, read_safetensors


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * g + b


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return np.vectorize(erf)(x)


def _bert_reference(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    """BertModel's forward pass written out in numpy (what the ONNX graph must compute)."""
    e = "embeddings"
    seq = ids.shape[1]
    x = w[f"{e}.word_embeddings.weight"][ids] + w[f"{e}.token_type_embeddings.weight"][np.zeros_like(ids)]
    x = x + w[f"{e}.position_embeddings.weight"][:seq]
    x = _layer_norm(x, w[f"{e}.LayerNorm.weight"], w[f"{e}.LayerNorm.bias"])
    hidden = x.shape[-1]
    d = hidden // heads
    add_mask = (1.0 - mask[:, None, None, :]) * -3.4e38

    def lin(t: np.ndarray, p: str) -> np.ndarray:
        return t @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    p = "encoder.layer.0"
    q, k, v = (lin(x, f"{p}.attention.self.{n}").reshape(*ids.shape, heads, d).transpose(0, 2, 1, 3)
               for n in ("query", "key", "value"))  # fmt: skip
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + add_mask
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = (s / s.sum(-1, keepdims=True)) @ v
    ctx = ctx.transpose(0, 2, 1, 3).reshape(*ids.shape, hidden)
    x = _layer_norm(lin(ctx, f"{p}.attention.output.dense") + x, w[f"{p}.attention.output.LayerNorm.weight"],
                    w[f"{p}.attention.output.LayerNorm.bias"])  # fmt: skip
    h = lin(x, f"{p}.intermediate.dense")
    h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
    out = lin(h, f"{p}.output.dense") + x
    return _layer_norm(out, w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"])


def _tiny_weights(hidden: int = 8, inter: int = 16, vocab: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (16, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    p = "encoder.layer.0"
    for n in ("query", "key", "value"):
        shapes[f"{p}.attention.self.{n}.weight"] = (hidden, hidden)
        shapes[f"{p}.attention.self.{n}.bias"] = (hidden,)
    shapes |= {
        f"{p}.attention.output.dense.weight": (hidden, hidden),
        f"{p}.attention.output.dense.bias": (hidden,),
        f"{p}.attention.output.LayerNorm.weight": (hidden,),
        f"{p}.attention.output.LayerNorm.bias": (hidden,),
        f"{p}.intermediate.dense.weight": (inter, hidden),
        f"{p}.intermediate.dense.bias": (inter,),
        f"{p}.output.dense.weight": (hidden, inter),
        f"{p}.output.dense.bias": (hidden,),
        f"{p}.output.LayerNorm.weight": (hidden,),
        f"{p}.output.LayerNorm.bias": (hidden,),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_minilm_onnx_matches_a_numpy_bert_layer() -> None:
    weights = _tiny_weights()
    model = minilm_onnx(weights, layers=1, heads=2, hidden=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 5, 7, 2, 0, 0], [1, 9, 3, 4, 6, 2]], np.int64)
    mask = (ids > 0).astype(np.int64)
    mask[1, -1] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (got,) = session.run(["last_hidden_state"], feed)
    want = _bert_reference(weights, ids, mask.astype(np.float64), heads=2)
    assert got.shape == (2, 6, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_read_safetensors_round_trip() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([[7, 8]], np.int64)}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blob = b""
    for name, arr in arrays.items():
        raw = arr.tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [len(blob), len(blob) + len(raw)]}  # fmt: skip
        blob += raw
    text = json.dumps(header).encode()
    got = read_safetensors(struct.pack("<Q", len(text)) + text + blob)
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], arrays["a"])
    np.testing.assert_array_equal(got["b"], arrays["b"])


def test_available_is_none_for_an_empty_cache(tmp_path) -> None:
    assert available("minilm", tmp_path) is None
    with pytest.raises(KeyError):
        available("no-such-model", tmp_path)
