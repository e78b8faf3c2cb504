"""Threshold search speed: Kiln's vectorized entropy search vs onnxruntime's entropy calibrator.

For every activation tensor of the example model (``builders/data/digits.onnx`` over
``digits_heldout.npz``; every float node output plus the graph inputs, collected with ONNX
Runtime by adding them as graph outputs) this builds, from the same activations:

* Kiln's 2048-bin |x| histograms (:class:`builders.histogram.AbsHistogram`), searched by
  :func:`builders.thresholds.entropy_amax` (vectorized) and ``entropy_amax_reference`` (loop);
* onnxruntime's ``HistogramCollector(method="entropy", num_bins=2048, num_quantized_bins=128)``
  fed the same arrays in one ``collect`` call (so it keeps exactly 2048 bins), then timed in
  ``compute_collection_result()``, which runs ``get_entropy_threshold`` per tensor.

Only the threshold search is timed, not histogram building. onnxruntime's entropy is MXNet's
variant (signed histogram, symmetric windows), so its amax differ from TensorRT-style ones;
the script reports by how much. Without the example model it falls back to 30 synthetic
activation-like tensors and says so. Writes ``benchmarks/results/calibration.json`` and a PNG.

    .venv/bin/python benchmarks/bench_calibration.py [--synthetic] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.histogram import AbsHistogram  # noqa: E402
from builders.thresholds import entropy_amax, entropy_amax_reference  # noqa: E402
from core.errors import NotFoundError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH = 64
KINDS = ("conv", "relu", "residual", "heavy", "softmax", "uniform")


def _example_paths() -> tuple[Path, Path] | None:
    try:
        from builders.examples import example_data_path, example_model_path

        return example_model_path(), example_data_path()
    except (ImportError, NotFoundError):
        return None


def collect_model_activations(model_path: Path, data_path: Path) -> dict[str, np.ndarray]:
    """Every float activation of the model over the data, flattened, via extra graph outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    names = [i.name for i in graph.input if i.name not in initializers]
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(out for out in node.output if out and types.get(out) in float_types)
    existing = {out.name for out in graph.output}
    for name in names:
        if name not in existing:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    data = np.load(data_path)
    inputs = {i.name: data[i.name] for i in session.get_inputs()}
    total = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, total, BATCH):
        feed = {key: value[start : start + BATCH] for key, value in inputs.items()}
        outputs = session.run(names, feed)
        for name, value in zip(names, outputs, strict=True):
            parts[name].append(np.asarray(value, dtype=np.float32).reshape(-1))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def synthetic_activations(count: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Activation-like tensors: conv outputs, ReLU, residual sums with outliers, softmax-ish."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for index in range(count):
        size = int(rng.integers(20_000, 200_000))
        kind = index % 6
        if kind == 0:
            x = rng.standard_normal(size) * rng.uniform(0.2, 4)
        elif kind == 1:
            x = np.maximum(rng.standard_normal(size) * rng.uniform(0.5, 3) + rng.uniform(-1, 1), 0)
        elif kind == 2:
            x = rng.laplace(size=size)
            x[rng.integers(0, size, 8)] *= 100  # a few outliers
        elif kind == 3:
            x = rng.standard_t(df=3, size=size)
        elif kind == 4:
            logits = rng.standard_normal(size) * 3
            x = np.exp(logits - logits.max())
        else:
            x = rng.uniform(-6, 6, size=size)
        tensors[f"synthetic_{index:02d}_{KINDS[kind]}"] = x.astype(np.float32)
    return tensors


def time_kiln(hists: dict[str, AbsHistogram], repeats: int) -> tuple[float, dict[str, float]]:
    best = float("inf")
    amaxes: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter_ns()
        amaxes = {name: entropy_amax(h.counts, h.edges, 128, 128) for name, h in hists.items()}
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
    return best, amaxes


def time_reference(hists: dict[str, AbsHistogram]) -> tuple[float, dict[str, float]]:
    start = time.perf_counter_ns()
    amaxes = {name: entropy_amax_reference(h.counts, h.edges, 128, 128) for name, h in hists.items()}
    return (time.perf_counter_ns() - start) / 1e9, amaxes


def time_onnxruntime(arrays: dict[str, np.ndarray], bins: int) -> tuple[float, dict[str, float]]:
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(
        method="entropy", symmetric=True, num_bins=bins, num_quantized_bins=128, percentile=99.999, scenario="same"
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        collector.collect(arrays)  # one call: histograms keep exactly `bins` bins
        start = time.perf_counter_ns()
        result = collector.compute_collection_result()
        seconds = (time.perf_counter_ns() - start) / 1e9
    amaxes = {name: float(max(abs(float(value[0])), abs(float(value[1])))) for name, value in result.items()}
    return seconds, amaxes


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["Kiln vectorized", "Kiln reference loop", "onnxruntime entropy"]
    seconds = [results["seconds"][key] for key in ("kiln_vectorized", "kiln_reference_loop", "onnxruntime")]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(labels, seconds, color=["#2a9d8f", "#e9c46a", "#e76f51"])
    ax.set_xscale("log")
    ax.set_xlabel(f"threshold search time for {results['num_tensors']} tensors, {results['bins']} bins (s, log)")
    for bar, value in zip(bars, seconds, strict=True):
        ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.3g} s", va="center")
    ax.set_title(f"Entropy threshold search: {results['speedup_vs_onnxruntime']:.0f}x faster than onnxruntime")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="use synthetic tensors even if the model exists")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the bundled example)")
    parser.add_argument("--data", type=Path, help=".npz keyed by input name (default: the example's held-out data)")
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="Kiln timing repeats (best is kept)")
    parser.add_argument("--output", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args(argv)

    paths = (args.model, args.data) if args.model and args.data else _example_paths()
    if paths is None or args.synthetic:
        source = "synthetic: 30 activation-like tensors (example model not found or --synthetic)"
        arrays = synthetic_activations()
    else:
        source = f"model {paths[0]} over {paths[1]}"
        arrays = collect_model_activations(*paths)
    print(f"source: {source}")
    hists: dict[str, AbsHistogram] = {}
    for name, values in arrays.items():
        hist = AbsHistogram(args.bins)
        hist.update(values)
        if hist.count and hist.amax > 0:
            hists[name] = hist
    arrays = {name: arrays[name] for name in hists}
    print(f"tensors: {len(hists)}, values: {sum(h.count for h in hists.values()):,}, bins: {args.bins}")

    kiln_s, kiln = time_kiln(hists, args.repeats)
    print(f"  Kiln vectorized entropy_amax : {kiln_s:8.4f} s (best of {args.repeats})")
    ref_s, ref = time_reference(hists)
    print(f"  Kiln reference loop          : {ref_s:8.4f} s")
    ort_s, ort_amax = time_onnxruntime(arrays, args.bins)
    print(f"  onnxruntime entropy          : {ort_s:8.4f} s")

    same_bin = sum(kiln[name] == ref[name] for name in hists)
    gaps = {name: relative_gap(min(kiln[name], hists[name].amax), ort_amax[name]) for name in hists}
    results: dict[str, Any] = {
        "source": source,
        "num_tensors": len(hists),
        "bins": args.bins,
        "num_quantized_bins": 128,
        "seconds": {"kiln_vectorized": kiln_s, "kiln_reference_loop": ref_s, "onnxruntime": ort_s},
        "speedup_vs_onnxruntime": ort_s / kiln_s,
        "speedup_vs_reference_loop": ref_s / kiln_s,
        "goal_speedup_vs_onnxruntime": 20.0,
        "vectorized_equals_reference": f"{same_bin}/{len(hists)}",
        "amax_relative_gap_vs_onnxruntime": {
            "median": statistics.median(gaps.values()),
            "max": max(gaps.values()),
        },
        "tensors": {
            name: {
                "count": hists[name].count,
                "max_abs": hists[name].amax,
                "kiln_amax": min(kiln[name], hists[name].amax),
                "reference_amax": min(ref[name], hists[name].amax),
                "onnxruntime_amax": ort_amax[name],
            }
            for name in hists
        },
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    print(f"  speedup vs onnxruntime       : {results['speedup_vs_onnxruntime']:8.1f}x (goal >= 20x)")
    print(f"  speedup vs reference loop    : {results['speedup_vs_reference_loop']:8.1f}x")
    print(f"  vectorized == reference bin  : {same_bin}/{len(hists)} tensors")
    print(
        "  amax gap Kiln vs onnxruntime : median {median:.1%}, max {max:.1%} (different algorithms)".format(
            **results["amax_relative_gap_vs_onnxruntime"]
        )
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    png = args.output.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.output} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
