"""Test and benchmark support: a llama-style decoder with KV cache as an ONNX graph, in optimum's I/O layout.

Inputs: input_ids [B,S] int64, attention_mask [B,T] int64 (T = past + S), position_ids [B,S] int64,
past_key_values.{i}.key / .value [B, kv_heads, past, head_dim] float32.
Outputs: logits [B,S,vocab] float32, present.{i}.key / .value [B, kv_heads, T, head_dim] float32.

Built with onnx.helper from numpy weights (HF orientation: projections are [out, in]), so the same
code writes the tiny random-weight test model and a real model converted from GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY_SHAPE = LlamaShape(vocab=260, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256)
TINY_BOS, TINY_EOS = 256, 257


def random_weights(shape: LlamaShape, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, kv = shape.head_dim, shape.kv_heads * shape.head_dim

    def w(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    weights = {"embed": (rng.standard_normal((shape.vocab, shape.hidden)) * 0.5).astype(np.float32)}
    for i in range(shape.layers):
        p = f"l{i}."
        weights[p + "attn_norm"] = (1 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)
        weights[p + "q"] = w(shape.heads * d, shape.hidden)
        weights[p + "k"] = w(kv, shape.hidden)
        weights[p + "v"] = w(kv, shape.hidden)
        weights[p + "o"] = w(shape.hidden, shape.heads * d)
        weights[p + "ffn_norm"] = (1 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)
        weights[p + "gate"] = w(shape.intermediate, shape.hidden)
        weights[p + "up"] = w(shape.intermediate, shape.hidden)
        weights[p + "down"] = w(shape.hidden, shape.intermediate)
    weights["norm"] = np.ones(shape.hidden, np.float32)
    weights["lm_head"] = w(shape.vocab, shape.hidden)
    return weights


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", n_out: int = 1, **attrs: object) -> str | list[str]:
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def o(self, op_type: str, inputs: list[str], hint: str = "", **attrs: object) -> str:
        return str(self.op(op_type, inputs, hint, 1, **attrs))


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, eps: float, hint: str) -> str:
    two = g.const("two", np.array(2.0, np.float32))
    var = g.o("ReduceMean", [g.o("Pow", [x, two])], keepdims=1, axes=[-1])
    std = g.o("Sqrt", [g.o("Add", [var, g.const("eps", np.array(eps, np.float32))])])
    return g.o("Mul", [g.o("Div", [x, std]), g.const(hint, weight.astype(np.float32))], hint)


def _linear(g: _Graph, x: str, w: np.ndarray, hint: str) -> str:
    return g.o("MatMul", [x, g.const(hint + "_w", np.ascontiguousarray(w.T).astype(np.float32))], hint)


def _rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    """HF rotate_half: x * cos + concat(-x2, x1) * sin; x is [B, H, S, D], cos/sin [B, 1, S, D]."""
    half = g.const("half", np.array([head_dim // 2, head_dim // 2], np.int64))
    x1, x2 = g.op("Split", [x, half], "half", n_out=2, axis=-1)
    rotated = g.o("Concat", [g.o("Neg", [x2]), x1], axis=-1)
    return g.o("Add", [g.o("Mul", [x, cos]), g.o("Mul", [rotated, sin])])


def build_decoder(
    shape: LlamaShape, weights: dict[str, np.ndarray], *, max_context: int | None = None
) -> onnx.ModelProto:
    g = _Graph()
    d, h, kvh = shape.head_dim, shape.heads, shape.kv_heads
    rep = h // kvh
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", shape.vocab])
    ]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kvh, "past_sequence_length", d]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kvh, "total_sequence_length", d]
                )
            )

    # rotary tables, gathered by position: [B, 1, S, D]
    inv = 1.0 / (shape.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    freqs = np.outer(np.arange(shape.max_positions, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    one = g.const("one", np.array([1], np.int64))
    cos = g.o("Unsqueeze", [g.o("Gather", [g.const("cos_table", np.cos(emb).astype(np.float32)), "position_ids"]), one])
    sin = g.o("Unsqueeze", [g.o("Gather", [g.const("sin_table", np.sin(emb).astype(np.float32)), "position_ids"]), one])

    # mask [B, 1, rep*S, T]: key t visible to query s when t <= past + s and attention_mask[b, t] == 1
    zero_s = g.const("zero", np.array(0, np.int64))
    one_s = g.const("one_s", np.array(1, np.int64))
    total = g.o("Gather", [g.o("Shape", ["attention_mask"]), one_s])
    seq = g.o("Gather", [g.o("Shape", ["input_ids"]), one_s])
    key_idx = g.o("Range", [zero_s, total, one_s])
    query_idx = g.o("Range", [g.o("Sub", [total, seq]), total, one_s])
    causal = g.o(
        "LessOrEqual",
        [
            g.o("Unsqueeze", [key_idx, g.const("ax0", np.array([0], np.int64))]),
            g.o("Unsqueeze", [query_idx, g.const("ax1", np.array([1], np.int64))]),
        ],
    )  # [S, T]
    padded = g.o(
        "Cast", [g.o("Unsqueeze", ["attention_mask", g.const("ax12", np.array([1, 2], np.int64))])], to=TensorProto.BOOL
    )
    mask = g.o("And", [causal, padded])  # [B, 1, S, T]
    mask = g.o("Tile", [mask, g.const("rep", np.array([1, 1, rep, 1], np.int64))])
    neg = g.const("neg", np.array(-1e4, np.float32))
    scale = g.const("scale", np.array(1.0 / np.sqrt(d), np.float32))

    x = g.o("Gather", [g.const("embed", weights["embed"]), "input_ids"], "embeds")
    for i in range(shape.layers):
        p = f"l{i}."
        hn = _rms_norm(g, x, weights[p + "attn_norm"], shape.rms_eps, p + "attn_norm")
        q = g.o("Reshape", [_linear(g, hn, weights[p + "q"], p + "q"), g.const("qs", np.array([0, 0, h, d], np.int64))])
        k = g.o(
            "Reshape", [_linear(g, hn, weights[p + "k"], p + "k"), g.const("ks", np.array([0, 0, kvh, d], np.int64))]
        )
        v = g.o(
            "Reshape", [_linear(g, hn, weights[p + "v"], p + "v"), g.const("vs", np.array([0, 0, kvh, d], np.int64))]
        )
        q = _rope(g, g.o("Transpose", [q], perm=[0, 2, 1, 3]), cos, sin, d)
        k = _rope(g, g.o("Transpose", [k], perm=[0, 2, 1, 3]), cos, sin, d)
        v = g.o("Transpose", [v], perm=[0, 2, 1, 3])
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2))
        qg = g.o("Reshape", [q, g.const("qg", np.array([0, kvh, -1, d], np.int64))])  # [B, kvh, rep*S, D]
        kt = g.o("Transpose", [f"present.{i}.key"], perm=[0, 1, 3, 2])
        scores = g.o("Mul", [g.o("MatMul", [qg, kt]), scale])
        probs = g.o("Softmax", [g.o("Where", [mask, scores, neg])], axis=-1)
        ctx = g.o("MatMul", [probs, f"present.{i}.value"])  # [B, kvh, rep*S, D]
        ctx = g.o("Reshape", [ctx, g.const("cs", np.array([0, h, -1, d], np.int64))])
        ctx = g.o(
            "Reshape", [g.o("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const("hs", np.array([0, 0, h * d], np.int64))]
        )
        x = g.o("Add", [x, _linear(g, ctx, weights[p + "o"], p + "o")])
        hn = _rms_norm(g, x, weights[p + "ffn_norm"], shape.rms_eps, p + "ffn_norm")
        gate = _linear(g, hn, weights[p + "gate"], p + "gate")
        act = g.o("Mul", [gate, g.o("Sigmoid", [gate])])
        up = _linear(g, hn, weights[p + "up"], p + "up")
        x = g.o("Add", [x, _linear(g, g.o("Mul", [act, up]), weights[p + "down"], p + "down")])
    x = _rms_norm(g, x, weights["norm"], shape.rms_eps, "final_norm")
    g.nodes.append(
        helper.make_node("MatMul", [x, g.const("lm_head", np.ascontiguousarray(weights["lm_head"].T))], ["logits"])
    )
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln-examples")
    model.ir_version = 8
    meta = {"max_position_embeddings": str(max_context or shape.max_positions), "architecture": "llama"}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def reference_logits(shape: LlamaShape, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Plain numpy forward over the whole sequence (no cache), for checking the graph."""
    d, h, kvh = shape.head_dim, shape.heads, shape.kv_heads
    s = ids.shape[0]
    inv = 1.0 / (shape.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    freqs = np.outer(np.arange(s, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + shape.rms_eps) * w

    def rope(x: np.ndarray) -> np.ndarray:  # [H, S, D]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    x = weights["embed"][ids].astype(np.float64)
    causal = np.tril(np.ones((s, s), bool))
    for i in range(shape.layers):
        p = f"l{i}."
        hn = rms(x, weights[p + "attn_norm"])
        q = rope((hn @ weights[p + "q"].T).reshape(s, h, d).transpose(1, 0, 2))
        k = rope((hn @ weights[p + "k"].T).reshape(s, kvh, d).transpose(1, 0, 2))
        v = (hn @ weights[p + "v"].T).reshape(s, kvh, d).transpose(1, 0, 2)
        k, v = np.repeat(k, h // kvh, 0), np.repeat(v, h // kvh, 0)
        sc = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        sc = np.where(causal, sc, -1e30)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(1, 0, 2).reshape(s, h * d)
        x = x + ctx @ weights[p + "o"].T
        hn = rms(x, weights[p + "ffn_norm"])
        gate = hn @ weights[p + "gate"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (hn @ weights[p + "up"].T)) @ weights[p + "down"].T
    return rms(x, weights["norm"]) @ weights["lm_head"].T
