"""The doctor's decision table over known GPUs and CPUs, and the probes' parsers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builders.hardware import SLOW, SUPPORTED, UNSUPPORTED, check_build, recommend, support_matrix
from core.errors import InvalidInputError, MissingDependencyError
from runtime.machine import (
    CpuInfo,
    GpuInfo,
    MachineInfo,
    parse_cc,
    parse_cpuinfo,
    parse_nvidia_smi,
    probe_gpus,
    probe_machine,
)

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
AMX = VNNI | {"amx_tile", "amx_int8", "amx_bf16"}
OLD = frozenset({"sse4_1", "sse4_2"})


def cpu(flags: frozenset[str] = AVX2) -> CpuInfo:
    return CpuInfo("Test CPU", "x86_64", 8, flags)


def gpu_machine(name: str, cc: tuple[int, int] | None, trt: str | None = "10.3.0") -> MachineInfo:
    return MachineInfo(
        cpu=cpu(),
        onnxruntime_version="1.20.0",
        ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        gpus=(GpuInfo(0, name, cc, 16384, "550.54"),),
        gpu_source="nvidia-smi",
        tensorrt_version=trt,
        polygraphy_version="0.49.9",
    )


# (GPU, cc, expected fp32, fp16, int8) with no TensorRT version floor applied (TensorRT 8-style)
GPU_TABLE = [
    ("Tesla K80", (3, 7), SUPPORTED, UNSUPPORTED, UNSUPPORTED),
    ("Jetson Nano", (5, 3), SUPPORTED, SLOW, UNSUPPORTED),
    ("Tesla P100", (6, 0), SUPPORTED, SLOW, UNSUPPORTED),
    ("GeForce GTX 1080", (6, 1), SUPPORTED, SLOW, SLOW),
    ("Jetson TX2", (6, 2), SUPPORTED, SLOW, UNSUPPORTED),
    ("Tesla V100", (7, 0), SUPPORTED, SUPPORTED, SLOW),
    ("Jetson AGX Xavier", (7, 2), SUPPORTED, SUPPORTED, SUPPORTED),
    ("Tesla T4", (7, 5), SUPPORTED, SUPPORTED, SUPPORTED),
    ("A100-SXM4-40GB", (8, 0), SUPPORTED, SUPPORTED, SUPPORTED),
    ("NVIDIA L4", (8, 9), SUPPORTED, SUPPORTED, SUPPORTED),
    ("NVIDIA H100 80GB HBM3", (9, 0), SUPPORTED, SUPPORTED, SUPPORTED),
]


@pytest.mark.parametrize(("name", "cc", "fp32", "fp16", "int8"), GPU_TABLE)
def test_tensorrt_decisions_per_gpu(name: str, cc: tuple[int, int], fp32: str, fp16: str, int8: str) -> None:
    matrix = support_matrix(gpu_machine(name, cc, trt="8.6.1"))
    got = tuple(matrix[("tensorrt", p)].status for p in ("fp32", "fp16", "int8"))
    assert got == (fp32, fp16, int8)
    for precision in ("fp32", "fp16", "int8"):
        assert name in matrix[("tensorrt", precision)].reason


def test_int8_reason_names_the_compute_capability_needed() -> None:
    verdict = support_matrix(gpu_machine("Tesla P100", (6, 0), trt="8.6.1"))[("tensorrt", "int8")]
    assert "6.1" in verdict.reason and "6.0" in verdict.reason


@pytest.mark.parametrize(("name", "cc"), [("GeForce GTX 1080", (6, 1)), ("Tesla P100", (6, 0))])
def test_tensorrt_10_refuses_gpus_below_its_floor(name: str, cc: tuple[int, int]) -> None:
    matrix = support_matrix(gpu_machine(name, cc, trt="10.3.0"))
    for precision in ("fp32", "fp16", "int8", "auto"):
        verdict = matrix[("tensorrt", precision)]
        assert verdict.status == UNSUPPORTED
        assert "7.0" in verdict.reason and "--target ort" in verdict.reason


def test_auto_takes_the_best_precision_status() -> None:
    assert support_matrix(gpu_machine("Tesla T4", (7, 5)))[("tensorrt", "auto")].status == SUPPORTED
    assert support_matrix(gpu_machine("K80", (3, 7), "8.6.1"))[("tensorrt", "auto")].status == SUPPORTED


def test_unknown_compute_capability_does_not_block() -> None:
    matrix = support_matrix(gpu_machine("Old driver GPU", None))
    assert matrix[("tensorrt", "int8")].status == SUPPORTED
    assert "unreadable" in matrix[("tensorrt", "int8")].reason


@pytest.mark.parametrize(
    ("trt", "polygraphy", "gpus", "missing"),
    [
        (None, None, (), ("TensorRT", "Polygraphy", "NVIDIA GPU")),
        ("10.3.0", "0.49.9", (), ("NVIDIA GPU",)),
        (None, "0.49.9", (GpuInfo(0, "T4", (7, 5)),), ("TensorRT",)),
        ("10.3.0", None, (GpuInfo(0, "T4", (7, 5)),), ("Polygraphy",)),
    ],
)
def test_missing_pieces_are_named(
    trt: str | None, polygraphy: str | None, gpus: tuple[GpuInfo, ...], missing: tuple[str, ...]
) -> None:
    machine = MachineInfo(
        cpu=cpu(), onnxruntime_version="1.20", gpus=gpus, tensorrt_version=trt, polygraphy_version=polygraphy
    )
    verdict = support_matrix(machine)[("tensorrt", "fp16")]
    assert verdict.status == UNSUPPORTED
    for piece in missing:
        assert piece in verdict.reason
    assert "pip install 'kiln-serve[tensorrt]'" in verdict.reason
    assert len(verdict.missing) == len(missing)


@pytest.mark.parametrize(
    ("flags", "int8", "words"),
    [
        (OLD, SLOW, "no AVX2"),
        (AVX2, SUPPORTED, "AVX2"),
        (VNNI, SUPPORTED, "VNNI"),
        (AMX, SUPPORTED, "AMX"),
        (frozenset({"fp", "asimd", "asimddp"}), SUPPORTED, "ARM"),
    ],
)
def test_cpu_int8_decisions(flags: frozenset[str], int8: str, words: str) -> None:
    matrix = support_matrix(MachineInfo(cpu=cpu(flags), onnxruntime_version="1.20"))
    assert matrix[("ort", "int8")].status == int8
    assert words in matrix[("ort", "int8")].reason
    assert matrix[("ort", "fp32")].status == SUPPORTED
    fp16 = matrix[("ort", "fp16")]
    assert fp16.status == SLOW and "for size, not speed" in fp16.reason


def test_matrix_covers_every_target_and_precision() -> None:
    matrix = support_matrix(MachineInfo(cpu=cpu()))
    assert set(matrix) == {(t, p) for t in ("ort", "tensorrt") for p in ("fp32", "fp16", "int8", "auto")}
    assert all(v.status == UNSUPPORTED for v in matrix.values())  # no onnxruntime, no TensorRT


def test_recommend_prefers_tensorrt_int8_then_cpu_int8() -> None:
    assert recommend(gpu_machine("Tesla T4", (7, 5))).startswith("--target tensorrt --precision int8")
    assert recommend(gpu_machine("Tesla V100", (7, 0))).startswith("--target tensorrt --precision fp16")
    cpu_only = MachineInfo(cpu=cpu(VNNI), onnxruntime_version="1.20")
    assert recommend(cpu_only).startswith("--target ort --precision int8")
    old = MachineInfo(cpu=cpu(OLD), onnxruntime_version="1.20")
    assert recommend(old).startswith("--target ort --precision fp32")


def test_check_build_refuses_missing_tensorrt_with_one_clear_message() -> None:
    machine = MachineInfo(cpu=cpu(), onnxruntime_version="1.20")
    with pytest.raises(MissingDependencyError) as info:
        check_build(machine, "tensorrt", "int8")
    text = str(info.value)
    assert "--target tensorrt --precision int8" in text
    assert "TensorRT" in text and "Polygraphy" in text and "NVIDIA GPU" in text
    assert "pip install 'kiln-serve[tensorrt]'" in text and "pypi.nvidia.com" in text


def test_check_build_refuses_hardware_that_cannot_and_warns_when_slow() -> None:
    with pytest.raises(InvalidInputError, match="6.1 or newer"):
        check_build(gpu_machine("Tesla P100", (6, 0), "8.6.1"), "tensorrt", "int8")
    warnings = check_build(gpu_machine("Tesla V100", (7, 0)), "tensorrt", "int8")
    assert len(warnings) == 1 and "INT8 tensor cores" in warnings[0]
    assert check_build(gpu_machine("Tesla T4", (7, 5)), "tensorrt", "int8") == []
    with pytest.raises(InvalidInputError, match="no build"):
        check_build(gpu_machine("Tesla T4", (7, 5)), "coreml", "fp32")


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni amx_tile amx_int8
"""


def test_parse_cpuinfo_reads_model_flags_and_cores() -> None:
    info = parse_cpuinfo(CPUINFO, "x86_64")
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.cores == 2
    assert info.avx2 and info.avx512 and info.vnni and info.amx
    assert info.isa() == ["AVX2", "AVX-512", "VNNI", "AMX"]
    arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd asimddp\n", "aarch64")
    assert arm.arm_dotprod and not arm.avx2 and arm.model == "unknown CPU"


def test_parse_nvidia_smi_and_compute_capability() -> None:
    text = "0, NVIDIA A100-SXM4-40GB, 8.0, 40960, 550.54.15\n1, Tesla T4, [N/A], 15360, 550.54.15\nbad line\n"
    gpus = parse_nvidia_smi(text)
    assert [g.name for g in gpus] == ["NVIDIA A100-SXM4-40GB", "Tesla T4"]
    assert gpus[0].compute_capability == (8, 0) and gpus[0].cc == "8.0"
    assert gpus[0].memory_mib == 40960 and gpus[0].driver == "550.54.15"
    assert gpus[1].compute_capability is None and gpus[1].cc == "unknown"
    assert parse_cc("12.0") == (12, 0) and parse_cc("") is None


def test_probe_gpus_survives_a_failing_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    def failing(argv: list[str]) -> str:
        raise subprocess.CalledProcessError(9, argv)

    gpus, source, notes = probe_gpus(failing, nvml=lambda: None)
    assert gpus == () and source == "none" and "nvidia-smi failed" in notes[0]
    gpus, source, _ = probe_gpus(lambda argv: "0, Tesla T4, 7.5, 15360, 535.1\n", nvml=lambda: None)
    assert source == "nvidia-smi" and gpus[0].compute_capability == (7, 5)


def test_probe_machine_on_this_host() -> None:
    machine = probe_machine()
    assert machine.onnxruntime_version is not None
    assert "CPUExecutionProvider" in machine.ort_providers
    assert machine.cpu.cores >= 1
    data = machine.to_dict()
    assert data["cpu"]["isa"] == machine.cpu.isa()
    assert isinstance(data["cpu"]["flags"], list)


def test_ort_int8_line_comes_from_measured_op_speed() -> None:
    from builders.hardware import measured_int8

    machine = MachineInfo(cpu=cpu(AVX2), onnxruntime_version="1.20.0")
    mixed = {"conv-dense": 0.35, "conv-pointwise": 0.5, "conv-depthwise": 1.4, "matmul": 0.37}
    verdict = support_matrix(machine, mixed)[("ort", "int8")]
    assert verdict.status == SUPPORTED and "measured here" in verdict.reason
    assert "conv-depthwise stay float" in verdict.reason and "0.35x" in verdict.reason
    slow = measured_int8(dict.fromkeys(mixed, 1.3))
    assert slow.status == SLOW and "every op pattern is slower in INT8" in slow.reason
    assert "measured" not in support_matrix(machine)[("ort", "int8")].reason  # no measurement: the ISA table
