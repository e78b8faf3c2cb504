"""Dev-only: write the tiny random-weight llama-style decoder that Kiln's tests and demo use.

    .venv/bin/python examples/llm/export_tiny_decoder.py [--out PATH] [--seed 16]

Two layers, hidden 64, 4 query heads over 2 KV heads (grouped-query attention), SwiGLU, RoPE,
vocabulary 260 (the 256 byte values of Kiln's byte tokenizer, then BOS 256 and EOS 257), context
256. Weights come from a fixed seed, so the file is the same on every run (about 470 KB).
The graph is built with onnx.helper from numpy weights (harness/llama.py), in optimum's KV-cache
layout; the same builder writes the real SmolLM2 model (examples/llm/convert_smollm2.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.llama import TINY_SHAPE, build_decoder, random_weights

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "builders" / "data" / "tiny_decoder.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    model = build_decoder(TINY_SHAPE, random_weights(TINY_SHAPE, args.seed))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
