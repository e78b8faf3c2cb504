"""Step 2 of an INT8 build: run the FP32 model over calibration data and choose thresholds.

Every activation a placement may quantize (``quantize.calibration_tensors``) is made a graph
output of a copy of the model; ONNX Runtime runs it batch by batch and each batch updates one
fixed-size ``AbsHistogram`` per tensor, so memory is bounded by one batch of activations plus
2048 bins per tensor, whatever the data set size. Thresholds come from ``builders.thresholds``.

The result is cached under ``<cache>/calib/<model_sha>-<data_sha>-<method>/`` and reused when the
model, the data and the method are unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from builders.calib_data import Dataset
from builders.calibration_file import CalibrationTable, to_trt_cache, write_trt_cache
from builders.histogram import DEFAULT_NUM_BINS, AbsHistogram
from builders.quantize import TensorRange, calibration_tensors, fold_constants, save_model
from builders.thresholds import DEFAULT_PERCENTILE, METHODS, choose_amaxes
from core.errors import InvalidInputError, RepositoryError

logger = logging.getLogger(__name__)

RANGES_FILE = "ranges.json"
CALIBRATION_FILE = "calibration.json"
TRT_CACHE_FILE = "calibration.cache"


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "entropy"
    percentile: float = DEFAULT_PERCENTILE
    batch_size: int = 32
    num_bins: int = DEFAULT_NUM_BINS

    @property
    def key(self) -> str:
        suffix = f"{self.percentile:g}" if self.method == "percentile" else ""
        bins = "" if self.num_bins == DEFAULT_NUM_BINS else f"-b{self.num_bins}"
        return f"{self.method}{suffix}{bins}"


@dataclass(frozen=True)
class Calibration:
    """Calibrated ranges of one (model, data, method), and where its files are."""

    ranges: dict[str, TensorRange]
    skipped: dict[str, str]
    method: str
    model_sha256: str
    data_sha256: str
    samples: int
    num_bins: int
    directory: Path
    reused: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, Path]:
        """Files published beside the artifact (calibration.json, TensorRT cache)."""
        found = {n: self.directory / n for n in (CALIBRATION_FILE, TRT_CACHE_FILE)}
        return {n: p for n, p in found.items() if p.is_file()}

    def manifest(self) -> dict[str, Any]:
        """The ``calibration`` section of kiln.json."""
        return {
            "method": self.method,
            "data_sha256": self.data_sha256,
            "model_sha256": self.model_sha256,
            "samples": self.samples,
            "bins": self.num_bins,
            "tensors": len(self.ranges),
            "skipped": dict(self.skipped),
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "files": sorted(self.files),
            **self.extra,
        }


def collect_histograms(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensors: Sequence[str],
    *,
    batch_size: int = 32,
    num_bins: int = DEFAULT_NUM_BINS,
    console: Console | None = None,
) -> dict[str, AbsHistogram]:
    """One |x| histogram per tensor over every batch of ``dataset`` (float tensors only)."""
    import onnxruntime as ort

    augmented = _with_outputs(model, tensors)
    histograms = {name: AbsHistogram(num_bins) for name in tensors}
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        path = save_model(augmented, Path(tmp) / "augmented.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise InvalidInputError(f"ONNX Runtime cannot run the model for calibration: {err}") from err
        names = [o.name for o in session.get_outputs()]
        total = len(dataset)
        console = console or Console(stderr=True)
        progress = Progress(
            TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=not console.is_terminal,
        )  # fmt: skip
        with progress:
            task = progress.add_task("calibrate", total=total)
            for inputs, _ in dataset.batches(batch_size):
                try:
                    outputs = session.run(names, inputs)
                except Exception as err:  # onnxruntime raises its own untyped errors
                    raise InvalidInputError(
                        f"the model failed on a calibration batch ({_shapes(inputs)}): {err}"
                    ) from err
                fetched = [*zip(names, outputs, strict=True), *inputs.items()]
                for name, value in fetched:
                    hist = histograms.get(name)
                    if hist is not None and isinstance(value, np.ndarray) and value.dtype.kind == "f":
                        hist.update(value)
                progress.advance(task, len(next(iter(inputs.values()))))
    return {k: h for k, h in histograms.items() if h.count or h.nonfinite}


def _shapes(inputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}: {v.dtype}[{','.join(map(str, v.shape))}]" for k, v in inputs.items())


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` where every tensor in ``tensors`` is also a graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fold_constants(out)
    existing = {o.name for o in out.graph.output}
    graph_inputs = {i.name for i in out.graph.input}
    for name in tensors:
        if name not in existing and name not in graph_inputs:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def calibrate(
    model: onnx.ModelProto,
    model_sha256: str,
    dataset: Dataset,
    settings: CalibrationSettings,
    cache_root: Path,
    *,
    console: Console | None = None,
) -> Calibration:
    """Calibrated ranges for ``model`` on ``dataset``, reusing a cached result when one matches."""
    if settings.method not in METHODS:
        raise InvalidInputError(f"--calib-method {settings.method!r} is unknown; choose one of {list(METHODS)}")
    if not 0 < settings.percentile <= 100:
        raise InvalidInputError(f"--percentile must be in (0, 100], got {settings.percentile}")
    if cache_root.exists() and not cache_root.is_dir():
        raise RepositoryError(
            f"calibration cache {str(cache_root)!r} is a file; pass a directory with --calib-cache"
        )
    directory = cache_root / f"{model_sha256[:16]}-{dataset.sha256[:16]}-{settings.key}"
    cached = _load_cached(directory, settings, model_sha256, dataset.sha256)
    if cached is not None:
        logger.info("reusing calibration in %s", directory)
        return cached
    start = time.perf_counter_ns()
    tensors = calibration_tensors(model)
    histograms = collect_histograms(
        model, dataset, tensors, batch_size=settings.batch_size, num_bins=settings.num_bins, console=console
    )
    amaxes, skipped = choose_amaxes(histograms, settings.method, percentile=settings.percentile)
    for name, reason in skipped.items():
        logger.warning("calibration: tensor %r stays in float: %s", name, reason)
    ranges = {
        name: TensorRange(amax, float(histograms[name].min or 0.0), float(histograms[name].max or 0.0))
        for name, amax in amaxes.items()
    }
    result = Calibration(
        ranges=ranges,
        skipped=skipped,
        method=settings.method,
        model_sha256=model_sha256,
        data_sha256=dataset.sha256,
        samples=len(dataset),
        num_bins=settings.num_bins,
        directory=directory,
        seconds=(time.perf_counter_ns() - start) / 1e9,
        extra={"percentile": settings.percentile} if settings.method == "percentile" else {},
    )
    write_calibration(result)
    return result


def write_calibration(result: Calibration) -> None:
    """Write ranges.json, calibration.json and the TensorRT cache into ``result.directory``."""
    try:
        result.directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RepositoryError(
            f"cannot create the calibration cache {str(result.directory)!r}: {err.strerror}; "
            "pass a writable directory with --calib-cache"
        ) from err
    payload = {
        "method": result.method,
        "model_sha256": result.model_sha256,
        "data_sha256": result.data_sha256,
        "samples": result.samples,
        "bins": result.num_bins,
        "extra": result.extra,
        "ranges": {k: [r.amax, r.min, r.max] for k, r in result.ranges.items()},
        "skipped": result.skipped,
    }
    table = calibration_table(result)
    try:
        table.write_json(result.directory / CALIBRATION_FILE)
        write_trt_cache(result.directory / TRT_CACHE_FILE, to_trt_cache(table))
        tmp = result.directory / f".{RANGES_FILE}.tmp"
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        tmp.replace(result.directory / RANGES_FILE)  # written last: its presence marks a complete cache
    except OSError as err:
        raise RepositoryError(
            f"cannot write the calibration cache in {str(result.directory)!r}: {err.strerror}; "
            "pass a writable directory with --calib-cache"
        ) from err


def calibration_table(result: Calibration) -> CalibrationTable:
    """The calibration.json / TensorRT cache view of a calibration (amax per tensor)."""
    return CalibrationTable(
        amax={k: r.amax for k, r in result.ranges.items()},
        method=result.method,
        num_bins=result.num_bins,
        num_samples=result.samples,
        data_sha256=result.data_sha256,
        model_sha256=result.model_sha256,
        method_params={k: float(v) for k, v in result.extra.items() if isinstance(v, int | float)},
        skipped=dict(result.skipped),
        trt_algorithm="MinMaxCalibration" if result.method == "minmax" else "EntropyCalibration2",
    )


def _load_cached(directory: Path, settings: CalibrationSettings, model_sha: str, data_sha: str) -> Calibration | None:
    path = directory / RANGES_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if (raw["model_sha256"], raw["data_sha256"], raw["method"]) != (model_sha, data_sha, settings.method):
            return None
        ranges = {k: TensorRange(float(v[0]), float(v[1]), float(v[2])) for k, v in raw["ranges"].items()}
        if not all(math.isfinite(r.amax) and r.amax > 0 for r in ranges.values()):
            raise ValueError("an amax is not a positive finite number")
        return Calibration(
            ranges=ranges,
            skipped=dict(raw["skipped"]),
            method=raw["method"],
            model_sha256=model_sha,
            data_sha256=data_sha,
            samples=int(raw["samples"]),
            num_bins=int(raw["bins"]),
            directory=directory,
            reused=True,
            extra=dict(raw.get("extra", {})),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        logger.warning("ignoring unreadable calibration cache %s (%s); recalibrating", path, err)
        return None


def scale_ranges(ranges: dict[str, TensorRange], factor: float) -> dict[str, TensorRange]:
    """Every amax multiplied by ``factor``: a deliberately wrong calibration (gate demos, tests)."""
    return {k: TensorRange(r.amax * factor, r.min, r.max) for k, r in ranges.items()}
