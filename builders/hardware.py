"""What Kiln can do on a machine: the target x precision decision table behind ``kiln doctor``
and ``kiln build``.

Every decision (``support_matrix``, ``recommend``, ``check_build``) is a pure function of a
``runtime.machine.MachineInfo`` so it can be tested over a table of known GPUs and CPUs;
``kiln build`` consults it before doing any work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import InvalidInputError, MissingDependencyError
from runtime.machine import INSTALL_HINT, CpuInfo, MachineInfo, missing_for_tensorrt, trt_major

logger = logging.getLogger(__name__)

SUPPORTED = "supported"
SLOW = "slow"
UNSUPPORTED = "unsupported"

TARGETS = ("ort", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "auto")
# Lowest compute capability each TensorRT major version is compiled for (support matrices).
TRT_MIN_CC: dict[int, tuple[int, int]] = {10: (7, 0), 11: (7, 0)}


@dataclass(frozen=True)
class Verdict:
    status: str  # SUPPORTED, SLOW or UNSUPPORTED
    reason: str
    missing: tuple[str, ...] = field(default=())  # absent dependencies, when that is the cause


def _ort_verdicts(machine: MachineInfo, op_speed: Mapping[str, float] | None = None) -> dict[str, Verdict]:
    if machine.onnxruntime_version is None:
        gone = Verdict(UNSUPPORTED, "onnxruntime is not importable; pip install onnxruntime", ("onnxruntime",))
        return dict.fromkeys(PRECISIONS, gone)
    cpu = machine.cpu
    isa = ", ".join(cpu.isa()) or "no AVX2"
    fp16 = Verdict(
        SLOW,
        "FP16 on a CPU target is for size, not speed: ONNX Runtime's CPU kernels mostly compute float16 "
        "by converting to float32, so expect equal or slower latency and half the weight bytes",
    )
    return {
        "fp32": Verdict(SUPPORTED, f"ONNX Runtime CPU kernels ({isa})"),
        "fp16": fp16,
        "int8": measured_int8(op_speed) if op_speed else _ort_int8(cpu),
        "auto": Verdict(SUPPORTED, "searches INT8 -> INT8 with sensitive layers in float -> FP16 -> FP32"),
    }


def measured_int8(op_speed: Mapping[str, float]) -> Verdict:
    """The ORT INT8 verdict from INT8/FP32 latency ratios measured on this CPU (``builders.op_speed``)."""
    faster = {p: r for p, r in sorted(op_speed.items()) if r <= 1.0}
    slower = {p: r for p, r in sorted(op_speed.items()) if r > 1.0}
    shown = ", ".join(f"{p} {r:.2f}x" for p, r in sorted(op_speed.items(), key=lambda kv: kv[1]))
    if not faster:
        return Verdict(SLOW, f"measured here, INT8/FP32 latency: {shown}: every op pattern is slower in INT8; use fp32")
    text = f"measured here, INT8/FP32 latency: {shown}"
    if slower:
        text += f"; {', '.join(slower)} stay float in kiln build (slower in INT8 on this CPU)"
    return Verdict(SUPPORTED, text)


def _ort_int8(cpu: CpuInfo) -> Verdict:
    if cpu.amx:
        return Verdict(SUPPORTED, "AMX int8 tiles: the fastest CPU INT8 path")
    if cpu.vnni:
        return Verdict(SUPPORTED, "VNNI int8 dot products: INT8 is clearly faster than FP32")
    if cpu.avx2:
        return Verdict(
            SUPPORTED,
            "AVX2 int8 kernels without VNNI: faster than FP32, U8S8 layout preferred (VNNI would be faster)",
        )
    if cpu.arm_dotprod:
        return Verdict(SUPPORTED, "ARM dot-product int8 kernels")
    return Verdict(SLOW, "no AVX2 (or ARM dot product): INT8 kernels fall back to slow paths; prefer fp32")


def _trt_verdicts(machine: MachineInfo) -> dict[str, Verdict]:
    missing = missing_for_tensorrt(machine)
    if missing:
        gone = Verdict(UNSUPPORTED, f"missing {', '.join(missing)}; {INSTALL_HINT}", missing)
        return dict.fromkeys(PRECISIONS, gone)
    gpu = machine.gpus[0]
    cc = gpu.compute_capability
    where = f"{gpu.name} (compute capability {gpu.cc})"
    if cc is None:
        unknown = Verdict(SUPPORTED, f"{gpu.name}: compute capability unreadable; TensorRT decides at build time")
        return dict.fromkeys(PRECISIONS, unknown)
    major = trt_major(machine.tensorrt_version)
    floor = TRT_MIN_CC.get(major or 0)
    if floor is not None and cc < floor:
        too_old = Verdict(
            UNSUPPORTED,
            f"TensorRT {machine.tensorrt_version} supports compute capability {floor[0]}.{floor[1]} and newer; "
            f"{where} is older; use --target ort",
        )
        return dict.fromkeys(PRECISIONS, too_old)
    fp32 = Verdict(SUPPORTED, f"{where}: FP32 (TF32 on 8.0+)" if cc >= (8, 0) else f"{where}: FP32")
    verdicts = {"fp32": fp32, "fp16": _trt_fp16(cc, where), "int8": _trt_int8(cc, where)}
    best = min(verdicts.values(), key=lambda v: (v.status != SUPPORTED, v.status != SLOW))
    verdicts["auto"] = Verdict(best.status, "searches INT8 -> FP16 -> FP32 on " + where)
    return verdicts


def _trt_fp16(cc: tuple[int, int], where: str) -> Verdict:
    if cc < (5, 3):
        return Verdict(UNSUPPORTED, f"FP16 TensorRT needs compute capability 5.3 or newer; {where}")
    if cc == (6, 1):
        return Verdict(SLOW, f"{where} runs FP16 at 1/64 of the FP32 rate; use fp32 or int8")
    if cc < (7, 0):
        return Verdict(SLOW, f"{where} has no FP16 tensor cores (compute capability 7.0+); small gain at most")
    return Verdict(SUPPORTED, f"{where}: FP16 tensor cores")


def _trt_int8(cc: tuple[int, int], where: str) -> Verdict:
    if cc < (6, 1) or cc == (6, 2):
        return Verdict(UNSUPPORTED, f"INT8 TensorRT needs compute capability 6.1 or newer (DP4A); {where}")
    if cc >= (7, 5) or cc == (7, 2):
        return Verdict(SUPPORTED, f"{where}: INT8 tensor cores")
    return Verdict(
        SLOW,
        f"{where} has no INT8 tensor cores (compute capability 7.5+); INT8 runs on DP4A and FP16 may be as fast",
    )


def support_matrix(machine: MachineInfo, op_speed: Mapping[str, float] | None = None) -> dict[tuple[str, str], Verdict]:
    """(target, precision) -> Verdict for every target and precision Kiln builds; the ORT INT8 line
    comes from ``op_speed`` (INT8/FP32 latency per op pattern measured here) when given."""
    matrix: dict[tuple[str, str], Verdict] = {}
    for target, verdicts in (("ort", _ort_verdicts(machine, op_speed)), ("tensorrt", _trt_verdicts(machine))):
        for precision in PRECISIONS:
            matrix[(target, precision)] = verdicts[precision]
    return matrix


def recommend(machine: MachineInfo, op_speed: Mapping[str, float] | None = None) -> str:
    """One line: the build Kiln recommends on this machine."""
    matrix = support_matrix(machine, op_speed)
    for target, precision in (("tensorrt", "int8"), ("tensorrt", "fp16"), ("ort", "int8")):
        verdict = matrix[(target, precision)]
        if verdict.status == SUPPORTED:
            return f"--target {target} --precision {precision}: {verdict.reason}"
    if matrix[("tensorrt", "fp32")].status == SUPPORTED:
        return f"--target tensorrt --precision fp32: {matrix[('tensorrt', 'fp32')].reason}"
    return f"--target ort --precision fp32: {matrix[('ort', 'fp32')].reason}"


def check_build(machine: MachineInfo, target: str, precision: str) -> list[str]:
    """Refuse an unsupported build before any work; return warnings for slow ones."""
    matrix = support_matrix(machine)
    verdict = matrix.get((target, precision))
    if verdict is None:
        raise InvalidInputError(
            f"no build for --target {target} --precision {precision}; targets {list(TARGETS)}, "
            f"precisions {list(PRECISIONS)}"
        )
    if verdict.status == UNSUPPORTED:
        what = f"--target {target} --precision {precision} cannot build on this machine"
        if verdict.missing:
            raise MissingDependencyError(f"{what}: {verdict.reason}")
        raise InvalidInputError(f"{what}: {verdict.reason}")
    if verdict.status == SLOW:
        return [f"{verdict.reason} (--target {target} --precision {precision} is slow on this machine)"]
    return []
