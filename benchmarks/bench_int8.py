"""INT8 vs FP32 on the example model: latency (batch 1 and max batch), size, accuracy drop.

The held-out digits are split as ``kiln build`` does (70% calibration, a disjoint 30% for
evaluation). FP32 reference and the INT8 candidates run interleaved in one measurement
(ABBA order, median of many runs), so the ratios hold even on a busy machine. Candidates: the
ORT placement in U8S8 full range, U8S8 + reduce_range and S8S8 (the format choice Kiln makes
per CPU is reported and checked against this measurement), and the TensorRT placement run in
ONNX Runtime (for accuracy only: ORT cannot fuse it, so its CPU latency is meaningless).

    .venv/bin/python benchmarks/bench_int8.py [--seconds 1.0]

Writes ``benchmarks/results/int8.json`` and ``int8.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.calib_data import load_dataset  # noqa: E402
from builders.calibrate import CalibrationSettings, calibrate  # noqa: E402
from builders.convert import optimize_fp32  # noqa: E402
from builders.examples import example_data_path, example_model_path  # noqa: E402
from builders.inspection import describe_model, load_model  # noqa: E402
from builders.quantize import OrtFormat, choose_ort_format, cpu_flags, quantize_model, save_model  # noqa: E402
from builders.validate import compare, latency_batches, make_runner, measure_latency, predict  # noqa: E402

MAX_BATCH = 32
FORMATS = {
    "U8S8": OrtFormat("uint8", False),
    "U8S8+reduce_range": OrtFormat("uint8", True),
    "S8S8": OrtFormat("int8", False),
}


def run(seconds: float, threads: int) -> dict[str, Any]:
    model_path = example_model_path()
    model = load_model(model_path)
    info = describe_model(model, model_path)
    calib, held = load_dataset(example_data_path(), info.inputs).split(0.3)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-int8-") as tmp:
        work = Path(tmp)
        calibration = calibrate(model, info.sha256, calib, CalibrationSettings(), work / "cache")
        paths = {"fp32": optimize_fp32(model_path, work / "fp32.onnx")}
        for name, fmt in FORMATS.items():
            quantized = quantize_model(model, calibration.ranges, "ort", ort_format=fmt).model
            paths[f"int8 {name}"] = save_model(quantized, work / f"{name}.onnx")
        trt = quantize_model(model, calibration.ranges, "tensorrt").model
        paths["int8 tensorrt-placement"] = save_model(trt, work / "trt.onnx")
        sessions = {k: make_runner(p, threads) for k, p in paths.items()}
        reference, labels = predict(sessions["fp32"], held, 256)
        accuracy = {}
        for name, session in sessions.items():
            outputs, _ = predict(session, held, 256)
            accuracy[name] = compare(reference, outputs, labels)
        timed = {k: s for k, s in sessions.items() if "tensorrt" not in k}
        latency = measure_latency(timed, latency_batches(held, MAX_BATCH), repeats=200, min_seconds=seconds)
        sizes = {k: p.stat().st_size for k, p in paths.items()}
    chosen = choose_ort_format(cpu_flags())
    chosen_key = f"int8 {chosen.name}"
    fp32_acc = accuracy["fp32"]["accuracy_reference"]
    rows = {}
    for name in paths:
        row: dict[str, Any] = {
            "bytes": sizes[name],
            "size_ratio": round(sizes[name] / model_path.stat().st_size, 4),
            "accuracy": accuracy[name]["accuracy_candidate"],
            "accuracy_drop": round(fp32_acc - accuracy[name]["accuracy_candidate"], 6),
            "top1_agreement": accuracy[name]["top1_agreement"],
        }
        for size, times in latency.items():
            if name in times:
                row[f"ms_batch{size}"] = times[name]
                row[f"speedup_batch{size}"] = round(times["fp32"] / times[name], 3)
        rows[name] = row
    fastest = {
        size: min((k for k in times if k.startswith("int8")), key=lambda k: times[k]) for size, times in latency.items()
    }
    return {
        "model": str(model_path),
        "held_out_samples": len(held),
        "calibration_samples": len(calib),
        "fp32_accuracy": fp32_acc,
        "chosen_format": chosen.name,
        "chosen_reason": chosen.reason,
        "fastest_int8_format_by_batch": fastest,
        "chosen": rows.get(chosen_key, {}),
        "candidates": rows,
        "goals": {
            "int8_faster_than_fp32": {s: rows[chosen_key][f"speedup_batch{s}"] > 1.0 for s in latency},
            "size_ratio_le_0.3": rows[chosen_key]["size_ratio"] <= 0.3,
            "accuracy_drop_lt_0.005": rows[chosen_key]["accuracy_drop"] < 0.005,
        },
        "threads": threads or "ORT default",
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
        "platform": platform.platform(),
    }


def plot(result: dict[str, Any], dest: Path) -> None:
    """Bars: speedup over FP32 per batch size, and size ratio, per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in result["candidates"].items() if "ms_batch1" in v}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        names = list(rows)
        for offset, size in ((-0.2, "1"), (0.2, str(MAX_BATCH))):
            left.bar([i + offset for i in range(len(names))], [rows[n][f"speedup_batch{size}"] for n in names],
                     width=0.4, label=f"batch {size}")  # fmt: skip
        left.axhline(1.0, color="grey", linestyle="--")
        left.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        left.set_ylabel("speedup over FP32 (median, interleaved)")
        left.legend()
        sizes = result["candidates"]
        right.bar(range(len(sizes)), [v["size_ratio"] for v in sizes.values()])
        right.axhline(0.3, color="grey", linestyle="--")
        right.set_xticks(range(len(sizes)), list(sizes), rotation=20, fontsize=8)
        right.set_ylabel("file size / FP32 source")
        fig.suptitle("INT8 vs FP32 on the example model")
        fig.tight_layout()
        fig.savefig(dest)
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum measuring time per batch size")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    args = parser.parse_args()
    result = run(args.seconds, args.threads)
    print(f"example: {result['model']}  held-out {result['held_out_samples']} samples")
    print(f"ORT format chosen for this CPU: {result['chosen_format']} ({result['chosen_reason']})")
    print(f"{'candidate':28} {'bytes':>8} {'size':>6} {'acc drop':>9} {'ms@1':>8} {'x@1':>6} {'ms@32':>8} {'x@32':>6}")
    for name, row in result["candidates"].items():
        print(
            f"{name:28} {row['bytes']:>8} {row['size_ratio']:>6.3f} {row['accuracy_drop']:>9.4f} "
            f"{row.get('ms_batch1', float('nan')):>8.4f} {row.get('speedup_batch1', float('nan')):>6.2f} "
            f"{row.get(f'ms_batch{MAX_BATCH}', float('nan')):>8.4f} "
            f"{row.get(f'speedup_batch{MAX_BATCH}', float('nan')):>6.2f}"
        )
    print(f"fastest INT8 format by batch: {result['fastest_int8_format_by_batch']}")
    print(f"goals: {result['goals']}")
    out = ROOT / "benchmarks" / "results" / "int8.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
