"""SmoothQuant's activation absmax with and without the attention mask: does padding change the result?

The calibration text of the real encoder (all-MiniLM-L6-v2, ``python harness/real_models.py fetch``)
is padded to 64 tokens. Padded positions carry activations that no output depends on; counting
them can only widen the per-channel absmax that SmoothQuant's scales and the int8 activation
ranges come from. This measures, on the same data in one run: how many positions are padding; per
weight-layer input and attention input, the absmax over real tokens only against the absmax over
all positions; and the whole search (``builders.smoothquant_search``) both ways -- alpha chosen,
attention MatMuls kept or not, and the held-out pooled/token cosine to FP32. Accuracy only: the
graphs differ only in scale values, so latency is the same.

    .venv/bin/python benchmarks/bench_smoothquant_mask.py [--calib 64] [--eval 128]

Writes ``benchmarks/results/smoothquant_mask.json`` and ``smoothquant_mask.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.calib_data import load_dataset  # noqa: E402
from builders.inspection import describe_model, load_model  # noqa: E402
from builders.smoothquant import activation_absmax, attention_inputs  # noqa: E402
from builders.smoothquant_search import search_smoothquant  # noqa: E402
from builders.validate import GateSettings, validate  # noqa: E402
from harness.real_models import available  # noqa: E402
from runtime.machine import probe_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=128, help="held-out sentences")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    cpu = probe_cpu()
    print(f"CPU: {cpu.model}; ISA: {', '.join(cpu.isa()) or 'unknown'}; {os.cpu_count()} cores", flush=True)
    real = available("minilm")
    if real is None:
        print("minilm: not fetched; run `python harness/real_models.py fetch` (skipped)")
        return
    model = load_model(real.onnx)
    info = describe_model(model, real.onnx)
    gate = GateSettings(metric="pooled-cosine", max_drop=0.005, batch_size=16)
    result: dict[str, Any] = {"cpu": {"model": cpu.model, "isa": cpu.isa()}, "model": real.description}
    with tempfile.TemporaryDirectory(prefix="kiln-sq-mask-") as tmp:
        work = Path(tmp)
        calib_arrays = {k: v[: args.calib] for k, v in np.load(real.calib).items()}
        np.savez(work / "calib.npz", **calib_arrays)
        np.savez(work / "eval.npz", **{k: v[: args.eval] for k, v in np.load(real.heldout).items()})
        calibration = load_dataset(work / "calib.npz", info.inputs)
        evaluation = load_dataset(work / "eval.npz", info.inputs)
        mask = calib_arrays["attention_mask"]
        result["padded_fraction"] = float(1.0 - mask.mean())
        print(f"calibration: {len(calibration)} sentences, {result['padded_fraction']:.1%} of positions are padding")
        batches = [dict(b) for b, _ in calibration.batches(16)]
        extra = attention_inputs(model)
        masked = activation_absmax(model, batches, extra, mask="attention_mask")
        whole = activation_absmax(model, batches, extra)
        ratios = {name: float(masked[name].max() / whole[name].max()) for name in sorted(masked)}
        result["absmax_ratio_real_over_all"] = ratios
        changed = {n: r for n, r in ratios.items() if r < 0.99}
        low, median = min(ratios.values()), float(np.median(list(ratios.values())))
        print(f"per-tensor absmax, real tokens / all positions: {len(changed)} of {len(ratios)} tensors lower by "
              f">1 %, min {low:.3f}, median {median:.3f}")  # fmt: skip
        runs: dict[str, dict[str, Any]] = {}
        for label, masking in (("real tokens only (mask)", True), ("all positions", False)):
            start = time.perf_counter()
            prepared = search_smoothquant(real.onnx, model, calibration, gate, 16, work, mask_padding=masking)
            seconds = time.perf_counter() - start
            check = validate(real.onnx, prepared.path, evaluation, gate, 1, latency=False)
            runs[label] = {
                "alpha": prepared.details["alpha"],
                "attention_int8": prepared.details["attention_int8"]["kept"],
                "alpha_search": prepared.details["alpha_search"],
                "pooled_cosine": check.metrics["pooled_cosine"],
                "pooled_cosine_min": check.metrics["pooled_cosine_min"],
                "token_cosine": check.metrics["cosine"],
                "search_s": seconds,
            }
            prepared.path.unlink()
            r = runs[label]
            print(f"{label:25s} alpha {r['alpha']}, attention int8 {r['attention_int8']!s:5s} pooled cosine "
                  f"{r['pooled_cosine']:.4f} (min {r['pooled_cosine_min']:.4f}), token cosine {r['token_cosine']:.4f}, "
                  f"search {seconds:.1f} s", flush=True)  # fmt: skip
        result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smoothquant_mask.json").write_text(json.dumps(result, indent=1))
    plot(ratios, args.out / "smoothquant_mask.png")
    print(f"wrote {args.out / 'smoothquant_mask.json'}")


def plot(ratios: dict[str, float], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    try:
        values = sorted(ratios.values())
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("activation tensor (weight-layer and attention inputs), sorted")
        ax.set_ylabel("absmax real tokens / all positions")
        ax.set_title("MiniLM calibration: how much padding widens the activation absmax", fontsize=9)
        fig.tight_layout()
        fig.savefig(dest)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
