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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from builders.calib_data import Dataset, release
from builders.calibration_file import CalibrationTable, to_trt_cache, write_trt_cache
from builders.histogram import DEFAULT_NUM_BINS, AbsHistogram
from builders.memory_budget import (
    DEFAULT_CALIB_MEMORY,
    Footprint,
    batch_for_budget,
    estimated_footprint,
    measured_footprint,
)
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
    memory: int = DEFAULT_CALIB_MEMORY  # bytes of activations one batch may hold (--calib-memory)

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
    batch_size: int = 0  # samples per calibration run under --calib-memory (0: reused from the cache)
    bytes_per_sample: int = 0  # activation bytes of one sample, measured (0: reused from the cache)

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
            "batch_size": self.batch_size,
            "activation_bytes_per_sample": self.bytes_per_sample,
            "files": sorted(self.files),
            **self.extra,
        }


@dataclass(frozen=True)
class Collected:
    """Histograms of one calibration pass and how it was batched."""

    histograms: dict[str, AbsHistogram]
    batch_size: int
    bytes_per_sample: int


def collect_histograms(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensors: Sequence[str],
    *,
    batch_size: int = 32,
    memory: int = DEFAULT_CALIB_MEMORY,
    num_bins: int = DEFAULT_NUM_BINS,
    console: Console | None = None,
) -> Collected:
    """One |x| histogram per tensor over ``dataset``, streamed in batches that fit ``memory``.

    The batch is at most ``batch_size`` and at most what ``memory`` holds: bytes per sample come
    from shape inference before any run (a budget too small for one sample fails here, naming the
    largest tensor), then from the first, one-sample run, which measures them exactly. Only one
    batch of activations exists at a time; the session is released before returning.
    """
    import onnxruntime as ort

    estimate = max(
        (estimated_footprint(model, tensors, {k: v.shape[1:] for k, v in g.inputs.items()}) for g in dataset.groups),
        key=lambda f: f.per_sample,
    )
    batch = batch_for_budget(estimate, memory, cap=batch_size) if dataset.fixed_batch is None else dataset.fixed_batch
    if dataset.fixed_batch is not None:
        batch_for_budget(Footprint(estimate.per_sample * batch, estimate.largest), memory)
    histograms = {name: AbsHistogram(num_bins) for name in tensors}
    measured = 0
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        path = save_model(_with_outputs(model, tensors), Path(tmp) / "augmented.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False  # freed activations go back, not into an arena at peak size
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise InvalidInputError(f"ONNX Runtime cannot run the model for calibration: {err}") from err
        names = [o.name for o in session.get_outputs()]
        progress = _progress("calibrating", console)
        with progress:
            task = progress.add_task("calibrate", total=len(dataset))
            plan = [batch]  # _stream reads plan[0] before each batch: lowered once measured
            for inputs, size in _stream(dataset, plan):
                try:
                    outputs = dict(zip(names, session.run(names, inputs), strict=True))
                except Exception as err:  # onnxruntime raises its own untyped errors
                    raise InvalidInputError(
                        f"the model failed on a calibration batch ({_shapes(inputs)}): {err}"
                    ) from err
                if not measured:  # the first run is one sample: measure, then size the batches
                    fetched = {**inputs, **{n: outputs[n] for n in names if n in histograms}}
                    footprint = measured_footprint(fetched, size)
                    measured = footprint.per_sample
                    if dataset.fixed_batch is None:
                        batch = plan[0] = min(batch, batch_for_budget(footprint, memory, cap=batch_size))
                    logger.info("calibration: %s of activations per sample; batches of %d", measured, batch)
                for name, value in [*outputs.items(), *inputs.items()]:
                    hist = histograms.get(name)
                    if hist is not None and isinstance(value, np.ndarray) and value.dtype.kind == "f":
                        hist.update(value)
                del outputs
                progress.advance(task, size)
        del session
    kept = {k: h for k, h in histograms.items() if h.count or h.nonfinite}
    return Collected(kept, batch, measured)


def _stream(dataset: Dataset, plan: list[int]) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(inputs, size) batches: one sample first (to measure), then ``plan[0]`` samples at a time.

    ``plan[0]`` is read before each batch, so the caller may lower it once it has measured. A
    model with a fixed batch axis gets exactly that many samples per run.
    """
    fixed = dataset.fixed_batch
    first = True
    for group in dataset.groups:
        start, total = 0, len(group)
        while start + (fixed or 1) <= total:
            size = fixed or (1 if first else plan[0])
            first = False
            chunk = {k: v[start : start + size] for k, v in group.inputs.items()}
            start += size
            yield chunk, len(next(iter(chunk.values())))
            release(group.inputs.values())  # a memory-mapped data set keeps only this batch resident


def _progress(label: str, console: Console | None) -> Progress:
    console = console or Console(stderr=True)
    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )  # fmt: skip


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
    return calibrate_each(model, model_sha256, dataset, settings, (settings.method,), cache_root, console=console)[
        settings.method
    ]


def calibrate_each(
    model: onnx.ModelProto,
    model_sha256: str,
    dataset: Dataset,
    settings: CalibrationSettings,
    methods: Sequence[str],
    cache_root: Path,
    *,
    console: Console | None = None,
) -> dict[str, Calibration]:
    """One calibration per threshold method, all from a single histogram pass over ``dataset``.

    Each method's result is cached on its own (and reused when model, data and method match); the
    FP32 model runs over the data once at most, whatever the number of methods.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidInputError(f"--calib-method {unknown[0]!r} is unknown; choose one of {list(METHODS)} or auto")
    if not 0 < settings.percentile <= 100:
        raise InvalidInputError(f"--percentile must be in (0, 100], got {settings.percentile}")
    if cache_root.exists() and not cache_root.is_dir():
        raise RepositoryError(f"calibration cache {str(cache_root)!r} is a file; pass a directory with --calib-cache")
    results: dict[str, Calibration] = {}
    missing: dict[str, CalibrationSettings] = {}
    for method in methods:
        each = replace(settings, method=method)
        directory = cache_root / f"{model_sha256[:16]}-{dataset.sha256[:16]}-{each.key}"
        cached = _load_cached(directory, each, model_sha256, dataset.sha256)
        if cached is not None:
            logger.info("reusing calibration in %s", directory)
            results[method] = cached
        else:
            missing[method] = each
    if not missing:
        return results
    start = time.perf_counter_ns()
    collected = collect_histograms(
        model, dataset, calibration_tensors(model), batch_size=settings.batch_size, memory=settings.memory,
        num_bins=settings.num_bins, console=console,
    )  # fmt: skip
    seconds = (time.perf_counter_ns() - start) / 1e9
    for method, each in missing.items():
        results[method] = _from_histograms(collected, each, model_sha256, dataset, cache_root, seconds)
    return {m: results[m] for m in methods}


def _from_histograms(collected: Collected, settings: CalibrationSettings, model_sha256: str, dataset: Dataset,
                     cache_root: Path, seconds: float) -> Calibration:  # fmt: skip
    histograms = collected.histograms
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
        directory=cache_root / f"{model_sha256[:16]}-{dataset.sha256[:16]}-{settings.key}",
        seconds=seconds,
        extra={"percentile": settings.percentile} if settings.method == "percentile" else {},
        batch_size=collected.batch_size,
        bytes_per_sample=collected.bytes_per_sample,
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
        "batch_size": result.batch_size,
        "bytes_per_sample": result.bytes_per_sample,
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
            batch_size=int(raw.get("batch_size", 0)),
            bytes_per_sample=int(raw.get("bytes_per_sample", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        logger.warning("ignoring unreadable calibration cache %s (%s); recalibrating", path, err)
        return None


def scale_ranges(ranges: dict[str, TensorRange], factor: float) -> dict[str, TensorRange]:
    """Every amax multiplied by ``factor``: a deliberately wrong calibration (gate demos, tests)."""
    return {k: TensorRange(r.amax * factor, r.min, r.max) for k, r in ranges.items()}
