"""Step 5 of a build: compare a candidate with the FP32 reference on held-out data, gate it.

Metrics (on the first model output): accuracy against labels when the data has them, top-1
agreement with the reference, mean cosine similarity, max/mean absolute error and MSE. Latency
at batch 1 and at the max batch: median of repeated runs, reference and candidate interleaved so
that noise from other processes hits both alike. The gate compares the *drop* in the chosen
metric (absolute) with ``--max-accuracy-drop``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builders.calib_data import Batch, Dataset
from core.errors import AccuracyGateError, InvalidInputError, KilnError
from runtime.onnxruntime import OrtRunner
from runtime.runner import DEFAULT_INTRA_OP_THREADS, Runner

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "top1", "cosine", "pooled-cosine", "mse")
MASK_NAMES = ("attention_mask", "input_mask", "mask")
DEFAULT_MAX_DROP = 0.01


@dataclass(frozen=True)
class GateSettings:
    metric: str | None = None  # None: accuracy when labels exist, else top1
    max_drop: float = DEFAULT_MAX_DROP
    repeats: int = 30
    batch_size: int = 64

    def resolved_metric(self, has_labels: bool, has_mask: bool = False) -> str:
        """The gate metric: --metric, else accuracy with labels, pooled-cosine for masked sequences, else top1."""
        metric = self.metric or ("accuracy" if has_labels else "pooled-cosine" if has_mask else "top1")
        if metric not in METRICS:
            raise InvalidInputError(f"--metric {metric!r} is unknown; choose one of {list(METRICS)}")
        if metric == "accuracy" and not has_labels:
            raise InvalidInputError(
                "--metric accuracy needs labels, but the evaluation data has no 'labels' array; "
                "add labels to the .npz or use --metric top1 (agreement with FP32)"
            )
        return metric


@dataclass(frozen=True)
class Validation:
    """A candidate measured against the reference."""

    metric: str
    max_drop: float
    drop: float
    metrics: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    samples: int
    data_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop + 1e-12

    def to_dict(self) -> dict[str, Any]:
        """The ``validation`` section of kiln.json."""
        data = asdict(self)
        data["passed"] = self.passed
        return data


def make_runner(model: Path, threads: int = DEFAULT_INTRA_OP_THREADS) -> Runner:
    """The runtime's ONNX Runtime runner, with serving's threading (``kiln serve``'s default), so the
    latency validated is the latency served; ``threads=0`` lets ONNX Runtime use every core."""
    try:
        return OrtRunner(Path(model), intra_op_threads=threads, model=Path(model).name)
    except KilnError as err:
        raise InvalidInputError(f"ONNX Runtime cannot load the model for validation: {err}") from err


def predict(runner: Runner, dataset: Dataset, batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First-output batches and matching label batches (empty when unlabeled)."""
    outputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    first = runner.output_names[0]
    for inputs, batch_labels in dataset.batches(batch_size):
        outputs.append(np.asarray(runner.run(inputs)[first], dtype=np.float64))
        if batch_labels is not None:
            labels.append(batch_labels)
    return outputs, labels


def attention_mask_input(dataset: Dataset) -> str | None:
    """The name of the data's attention-mask input (integer, [batch, sequence]), checked to be 0/1.

    Found by name (``attention_mask``, ``input_mask``, ``mask``); None when the model has none.
    Any other value than 0 and 1 is refused: the mask says which positions are real tokens.
    """
    if not dataset.groups:
        return None
    inputs = dataset.groups[0].inputs
    name = next((n for n in inputs if n.lower() in MASK_NAMES or n.lower().endswith("attention_mask")), None)
    if name is None or inputs[name].dtype.kind not in "biu" or inputs[name].ndim != 2:
        return None
    for group in dataset.groups:
        values = group.inputs[name]
        bad = (values != 0) & (values != 1)
        if bad.any():
            sample, position = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInputError(
                f"{dataset.source!r}: attention mask input {name!r} holds {int(values[sample, position])} at sample "
                f"{sample}, position {position}; a mask must be 0 (padding) or 1 (real token) everywhere. "
                "Pass the tokenizer's attention_mask unchanged"
            )
    return name


def batch_masks(dataset: Dataset, batch_size: int, name: str | None) -> list[np.ndarray]:
    """The attention mask of every batch ``predict`` runs (empty when ``name`` is None)."""
    if name is None:
        return []
    return [inputs[name] for inputs, _ in dataset.batches(batch_size)]


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] = (),
) -> dict:
    """Output metrics of candidate vs reference (first output), batch by batch.

    Rows are samples, or with ``masks`` (an attention mask per batch, output [batch, sequence, ...])
    the real-token positions only: padding carries no meaning and is never compared. Outputs with a
    sequence axis also get ``pooled_cosine``: cosine of the (masked) mean over positions, the
    sentence embedding of an encoder. Batches may differ in width (sequence lengths vary).
    """
    agree: list[np.ndarray] = []
    cosines: list[np.ndarray] = []
    pooled: list[np.ndarray] = []
    max_abs, sum_abs, sum_sq, count = 0.0, 0.0, 0.0, 0
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        mask = masks[i].astype(bool) if i < len(masks) and r.ndim >= 3 and r.shape[:2] == masks[i].shape else None
        if r.ndim >= 3:
            weights = mask.astype(np.float64) if mask is not None else np.ones(r.shape[:2])
            w = weights.reshape(*weights.shape, *([1] * (r.ndim - 2)))
            denom = np.maximum(w.sum(1), 1.0)
            pooled.append(_row_cosine(((r * w).sum(1) / denom).reshape(len(r), -1),
                                      ((c * w).sum(1) / denom).reshape(len(c), -1)))  # fmt: skip
        rows_r = r[mask].reshape(int(mask.sum()), -1) if mask is not None else r.reshape(r.shape[0], -1)
        rows_c = c[mask].reshape(int(mask.sum()), -1) if mask is not None else c.reshape(c.shape[0], -1)
        diff = np.abs(rows_r - rows_c)
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            sum_abs += float(diff.sum())
            sum_sq += float(np.square(diff).sum())
            count += diff.size
            agree.append(rows_r.argmax(1) == rows_c.argmax(1))
            cosines.append(_row_cosine(rows_r, rows_c))
    metrics = {
        "top1_agreement": float(np.mean(np.concatenate(agree))) if agree else 1.0,
        "cosine": float(np.mean(np.concatenate(cosines))) if cosines else 1.0,
        "max_abs_error": max_abs,
        "mean_abs_error": sum_abs / count if count else 0.0,
        "mse": sum_sq / count if count else 0.0,
    }
    if pooled:
        metrics["pooled_cosine"] = float(np.mean(np.concatenate(pooled)))
        metrics["pooled_cosine_min"] = float(np.min(np.concatenate(pooled)))
    if masks:
        metrics["compared_positions"] = float(sum(int(m.sum()) for m in masks))
    if labels:
        y = np.concatenate(labels)
        ref_top = np.concatenate([r.reshape(r.shape[0], -1).argmax(1) for r in reference])
        cand_top = np.concatenate([c.reshape(c.shape[0], -1).argmax(1) for c in candidate])
        metrics["accuracy_reference"] = float(np.mean(ref_top == y))
        metrics["accuracy_candidate"] = float(np.mean(cand_top == y))
    return metrics


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)


def metric_drop(metrics: dict[str, float], metric: str) -> float:
    """How much worse the candidate is on ``metric`` (absolute; 0 = no loss)."""
    if metric == "accuracy":
        return metrics["accuracy_reference"] - metrics["accuracy_candidate"]
    if metric == "top1":
        return 1.0 - metrics["top1_agreement"]
    if metric == "cosine":
        return 1.0 - metrics["cosine"]
    if metric == "pooled-cosine":
        if "pooled_cosine" not in metrics:
            raise InvalidInputError(
                "--metric pooled-cosine needs a first output with a sequence axis ([batch, sequence, hidden]); "
                "this model's output has none: use --metric cosine"
            )
        return 1.0 - metrics["pooled_cosine"]
    return metrics["mse"]


def latency_batches(dataset: Dataset, max_batch: int) -> dict[str, Batch]:
    """Inputs at batch 1 and at ``max_batch`` (samples repeated if the data has fewer).

    A model with a fixed batch axis is timed at that batch only.
    """
    first = dataset.first_batch(1)
    result = {str(len(next(iter(first.values())))): first}
    if max_batch > 1 and not dataset.fixed_batch:
        group = dataset.groups[0]
        reps = -(-max_batch // len(group))
        result[str(max_batch)] = {k: np.concatenate([v] * reps)[:max_batch] for k, v in group.inputs.items()}
    return result


def measure_latency(
    runners: dict[str, Runner], batches: dict[str, Batch], repeats: int, min_seconds: float = 0.3
) -> dict[str, dict[str, float]]:
    """Median ms per runner and batch size.

    Runners are interleaved, in alternating order (ABBA), so drift and noise from other
    processes hit all alike; at least ``repeats`` rounds, more until ``min_seconds`` have passed
    (tiny models need thousands of runs for a stable median), at most 5000.
    """
    result: dict[str, dict[str, float]] = {}
    names = list(runners)
    for size, inputs in batches.items():
        times: dict[str, list[float]] = {name: [] for name in names}
        for runner in runners.values():
            runner.run(inputs)  # warm-up
        begin = time.perf_counter_ns()
        rounds = 0
        while rounds < max(1, repeats) or (time.perf_counter_ns() - begin < min_seconds * 1e9 and rounds < 5000):
            for name in names if rounds % 2 == 0 else reversed(names):
                start = time.perf_counter_ns()
                runners[name].run(inputs)
                times[name].append((time.perf_counter_ns() - start) / 1e6)
            rounds += 1
        result[size] = {name: round(statistics.median(t), 4) for name, t in times.items()}
    return result


def validate(
    reference: Path,
    candidate: Path,
    dataset: Dataset,
    settings: GateSettings,
    max_batch: int,
    *,
    latency: bool = True,
) -> Validation:
    """Measure ``candidate`` against ``reference`` on ``dataset`` (metrics, and latency unless not asked)."""
    mask = attention_mask_input(dataset)
    metric = settings.resolved_metric(dataset.has_labels, mask is not None)
    runners = {"reference": make_runner(reference), "candidate": make_runner(candidate)}
    try:
        ref_out, labels = predict(runners["reference"], dataset, settings.batch_size)
        cand_out, _ = predict(runners["candidate"], dataset, settings.batch_size)
        metrics = compare(ref_out, cand_out, labels, batch_masks(dataset, settings.batch_size, mask))
        del ref_out, cand_out
        timings: dict[str, dict[str, float]] = {}
        if latency:
            timings = measure_latency(runners, latency_batches(dataset, max_batch), settings.repeats)
            timings = {size: with_speedup(row["reference"], row["candidate"]) for size, row in timings.items()}
    finally:
        for runner in runners.values():
            runner.close()
    drop = metric_drop(metrics, metric)
    logger.info("validation: %s drop %.5f (budget %.5f)", metric, drop, settings.max_drop)
    return Validation(metric, settings.max_drop, drop, metrics, timings, len(dataset), dataset.sha256)


def with_speedup(reference_ms: float, candidate_ms: float) -> dict[str, float]:
    """A latency row: both medians and the candidate's speedup over the reference."""
    speedup = round(reference_ms / candidate_ms, 3) if candidate_ms > 0 else 0.0
    return {"reference": reference_ms, "candidate": candidate_ms, "speedup": speedup}


def speed_key(validation: Validation | None) -> tuple[float, float]:
    """How ``auto`` ranks candidates: speedup over FP32 at the max batch, then at batch 1.

    Speedups come from interleaved timings against the same reference, so they compare across
    candidates even when each was timed in its own run. A missing measurement ranks last.
    """
    rows = list(validation.latency_ms.values()) if validation is not None else []
    if not rows:
        return (0.0, 0.0)
    return (float(rows[-1].get("speedup", 0.0)), float(rows[0].get("speedup", 0.0)))


SPEED_TIE = 0.03  # speedups within 3 % of the fastest are a tie (timing noise on a shared CPU)


def choose_fastest(validations: Sequence[Validation | None]) -> int:
    """Index of the fastest candidate within budget (``speed_key``); the last one when none passes.

    Candidates are ordered by the caller with the safest (FP32) last, so "none within budget" falls
    back to it, and among candidates tied with the fastest (max-batch speedup within ``SPEED_TIE``
    of its) the last one wins: FP16 at 1.001x does not displace FP32 at 0.996x.
    """
    passing = [i for i, v in enumerate(validations) if v is not None and v.passed]
    if not passing:
        return len(validations) - 1
    best = max(speed_key(validations[i]) for i in passing)
    tied = [i for i in passing if speed_key(validations[i])[0] >= best[0] * (1 - SPEED_TIE)]
    return tied[-1]


def advice(calib_method: str | None, precision: str, mode: str = "static") -> list[str]:
    """What to try when a candidate fails the gate (never what this build already did)."""
    tips = []
    if precision != "auto":
        tips.append("--precision auto (keeps the most sensitive layers in float, falls back to fp16/fp32)")
    if mode == "dynamic":
        tips.append("--int8-mode static with --calib DATA (calibrated activation ranges)")
    else:
        tips.append("more (and more representative) calibration data in --calib")
        tips.append("--int8-mode dynamic for transformer encoders on --target ort (activations quantized per run)")
        for method in ("percentile", "minmax", "entropy"):
            if calib_method is not None and calib_method != method:
                tips.append(f"--calib-method {method}")
    tips.append("a larger --max-accuracy-drop if the loss is acceptable")
    return tips


def gate_error(validation: Validation, precision: str, calib_method: str | None, report: Path | None,
               mode: str = "static") -> str:  # fmt: skip
    """The message of the AccuracyGateError for a failed validation."""
    over = validation.drop - validation.max_drop
    msg = (
        f"{precision} candidate loses {validation.drop:.4f} {validation.metric} "
        f"({_metric_pair(validation)}), over the {validation.max_drop:.4f} budget by {over:.4f}; "
        f"nothing was published. Try: {'; '.join(advice(calib_method, precision, mode))}"
    )
    if report is not None:
        msg += f". Report: {report}"
    return msg


def check_gate(validation: Validation, precision: str, calib_method: str | None, report: Path | None = None,
               mode: str = "static") -> None:  # fmt: skip
    """Raise AccuracyGateError when ``validation`` is over its budget."""
    if not validation.passed:
        raise AccuracyGateError(gate_error(validation, precision, calib_method, report, mode))


def _metric_pair(v: Validation) -> str:
    m = v.metrics
    if v.metric == "accuracy":
        return f"{m['accuracy_reference']:.4f} -> {m['accuracy_candidate']:.4f}"
    if v.metric == "top1":
        return f"top-1 agreement with FP32 {m['top1_agreement']:.4f}"
    if v.metric == "cosine":
        return f"cosine {m['cosine']:.6f}"
    if v.metric == "pooled-cosine":
        return f"mean-pooled cosine {m.get('pooled_cosine', 0.0):.6f} over real tokens"
    return f"mse {m['mse']:.6g}"


def report_markdown(title: str, validation: Validation, details: dict[str, Any] | None = None, *,
                    calib_method: str | None = None, mode: str = "static") -> str:  # fmt: skip
    """A human-readable validation report."""
    verdict = "PASSED" if validation.passed else "FAILED"
    lines = [
        f"# {title}",
        "",
        f"Gate: **{verdict}** — {validation.metric} drop {validation.drop:.4f} "
        f"(budget {validation.max_drop:.4f}; {_metric_pair(validation)}), "
        f"{validation.samples} held-out samples, data sha256 {validation.data_sha256[:16]}…",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.6g} |" for k, v in validation.metrics.items()),
        "",
        "| batch | FP32 reference ms | candidate ms | speedup |",
        "|---|---|---|---|",
        *(
            f"| {b} | {r['reference']:.4f} | {r['candidate']:.4f} | {r.get('speedup', 0):.3f}x |"
            for b, r in validation.latency_ms.items()
        ),
        "",
    ]
    for key, value in (details or {}).items():
        lines.append(f"- {key}: {value}")
    if not validation.passed:
        lines += ["", "What to try:", *(f"- {tip}" for tip in advice(calib_method, "int8", mode))]
    return "\n".join(lines) + "\n"
