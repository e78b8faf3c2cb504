"""SmoothQuant static INT8, searched: one absmax pass, alpha chosen on a calibration slice, attention MatMuls tried.

Used by ``kiln build --smoothquant`` and by ``--precision auto`` on transformer graphs
(``builders.auto``). The per-channel absmax of every weight layer's input (and of the attention
score/context MatMul inputs) is measured once on the calibration data, real-token positions only
when the data has an attention mask; for each alpha in :data:`~builders.smoothquant.ALPHAS` the
smoothed model's ranges follow from it without another run (:func:`~builders.smoothquant.smoothed_absmax`).
Each alpha is scored on a slice of the calibration data (gate metric, then MSE); with the best one
the attention score/context MatMuls go int8 too when the slice stays within the budget. The caller
validates the result on the evaluation data and applies the gate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from builders.calib_data import Dataset
from builders.prepare import PreparedOnnx
from builders.quantize import prepare_model
from builders.smoothquant import (
    ALPHAS,
    activation_absmax,
    attention_inputs,
    normalized_inputs,
    place_weight_layers,
    smooth_with_scales,
    smoothed_absmax,
)
from builders.validate import GateSettings, attention_mask_input, validate
from core.errors import InvalidInputError

logger = logging.getLogger(__name__)


def smoothquant_applies(model: onnx.ModelProto) -> bool:
    """Whether the graph has weight MatMul/Gemm layers fed by a LayerNorm-like node (a transformer)."""
    return bool(normalized_inputs(prepare_model(model).model))


def search_smoothquant(reference: Path, model: onnx.ModelProto, calibration: Dataset, gate: GateSettings,
                       batch_size: int, workdir: Path, *, mask_padding: bool = True) -> PreparedOnnx:  # fmt: skip
    """The best SmoothQuant candidate of ``model`` (written under ``workdir``), not yet validated on held-out data.

    ``batch_size`` samples per absmax run (memory is one batch of activations). Padded positions
    (attention mask 0) do not count in the absmax unless ``mask_padding`` is False (kept to measure
    the difference, ``benchmarks/bench_smoothquant_mask.py``). The details say the alpha search,
    the attention decision and the absmax pass (samples, the mask input used, seconds).
    """
    prepared = prepare_model(model)
    model = prepared.model
    search_slice = calibration.split(0.3)[1] if len(calibration) >= 4 else calibration
    mask = attention_mask_input(calibration) if mask_padding else None

    def stream() -> Iterator[dict[str, np.ndarray]]:
        return (inputs for inputs, _ in calibration.batches(max(1, batch_size)))

    start = time.perf_counter()
    extra = attention_inputs(model)
    absmax = activation_absmax(model, stream(), extra, mask=mask)
    pass_seconds = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], float, Path, int, int] | None = None
    for alpha in ALPHAS:
        smoothed, scales = smooth_with_scales(model, absmax, alpha)
        quantized, placement = place_weight_layers(smoothed, _without(smoothed_absmax(absmax, scales), extra))
        path = workdir / f"smoothquant-alpha-{alpha}.onnx"
        onnx.save(quantized, str(path))
        check = validate(reference, path, search_slice, gate, 1, latency=False)
        rows.append({"alpha": alpha, "metric": check.metric, "drop": check.drop, "mse": check.metrics["mse"]})
        logger.info("smoothquant alpha %.2f: %s drop %.5f", alpha, check.metric, check.drop)
        key = (check.drop, check.metrics["mse"])
        if best is None or key < best[0]:
            if best is not None:
                best[2].unlink()
            best = (key, alpha, path, len(scales), len(placement.activations))
        else:
            path.unlink()
    if best is None:  # ALPHAS is not empty
        raise InvalidInputError("SmoothQuant tried no alpha")
    _, alpha, path, count, activations = best
    for row in rows:
        row["chosen"] = row["alpha"] == alpha
    attention_row: dict[str, Any] = {"tried": bool(extra), "kept": False}
    if extra:  # attention score/context MatMuls in int8 too, kept only while the slice stays within the budget
        smoothed, scales = smooth_with_scales(model, absmax, alpha)
        quantized, placement = place_weight_layers(smoothed, smoothed_absmax(absmax, scales), attention=True)
        with_attention = workdir / "smoothquant-attention.onnx"
        onnx.save(quantized, str(with_attention))
        check = validate(reference, with_attention, search_slice, gate, 1, latency=False)
        attention_row |= {"metric": check.metric, "drop": check.drop, "passed": check.passed}
        if check.passed:
            path.unlink()
            path, activations, attention_row["kept"] = with_attention, len(placement.activations), True
        else:
            with_attention.unlink()
    details: dict[str, Any] = {
        "mode": "static",
        "method": "smoothquant",
        "alpha": alpha,
        "alpha_search": rows,
        "attention_int8": attention_row,
        "smoothed_activations": count,
        "quantized_activations": activations,
        "absmax_pass": {"samples": len(calibration), "masked_by": mask, "seconds": round(pass_seconds, 3)},
        "placement": "Q/DQ on weight MatMul/Gemm inputs"
        + (" and attention score/context MatMuls" if attention_row["kept"] else "")
        + "; LayerNorm, Softmax, GELU"
        + ("" if attention_row["kept"] else " and activation x activation MatMuls (attention scores, context)")
        + " in float",
    }
    note = (f"SmoothQuant alpha {alpha} (searched {', '.join(str(a) for a in ALPHAS)}), {count} activation(s) "
            f"smoothed, {activations} quantized")  # fmt: skip
    return PreparedOnnx(path, "int8", "ort", None, (*prepared.notes, note), details)


def _without(absmax: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """``absmax`` less the attention inputs (the weight-only placement must not see their ranges)."""
    return {k: v for k, v in absmax.items() if k not in names}
