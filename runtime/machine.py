"""What this machine has: CPU ISA, ONNX Runtime, NVIDIA GPUs, TensorRT and Polygraphy.

``probe_machine`` is I/O at the edge and returns a ``MachineInfo``; parsing is pure and tested on
recorded ``/proc/cpuinfo`` and ``nvidia-smi`` text. What Kiln decides from it (the support table)
is ``builders.hardware``.
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


INSTALL_HINT = (
    "pip install 'kiln-serve[tensorrt]' on a CUDA host with NVIDIA's package index "
    "(--extra-index-url https://pypi.nvidia.com)"
)
NVIDIA_SMI_TIMEOUT_S = 5.0
NVIDIA_SMI_QUERY = "index,name,compute_cap,memory.total,driver_version"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    architecture: str
    cores: int
    flags: frozenset[str] = frozenset()

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def arm_dotprod(self) -> bool:
        return "asimddp" in self.flags

    def isa(self) -> list[str]:
        """The ISA features that matter to Kiln, in order of capability."""
        named = (
            ("AVX2", self.avx2),
            ("AVX-512", self.avx512),
            ("VNNI", self.vnni),
            ("AMX", self.amx),
            ("ARM dot product", self.arm_dotprod),
        )
        return [name for name, present in named if present]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int] | None
    memory_mib: int = 0
    driver: str = ""

    @property
    def cc(self) -> str:
        """Compute capability as Triton writes it (``"8.0"``), or ``"unknown"``."""
        if self.compute_capability is None:
            return "unknown"
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass(frozen=True)
class MachineInfo:
    cpu: CpuInfo
    onnxruntime_version: str | None = None
    ort_providers: tuple[str, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    gpu_source: str = "none"  # "nvml", "nvidia-smi" or "none"
    tensorrt_version: str | None = None
    polygraphy_version: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def cuda_driver(self) -> str | None:
        return self.gpus[0].driver if self.gpus and self.gpus[0].driver else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"]["flags"] = sorted(self.cpu.flags)
        data["cpu"]["isa"] = self.cpu.isa()
        for gpu, raw in zip(self.gpus, data["gpus"], strict=True):
            raw["compute_capability"] = gpu.cc
        data["cuda_driver"] = self.cuda_driver
        return data


# ---------------------------------------------------------------- probing (I/O at the edge)


def parse_cpuinfo(text: str, architecture: str = "", cores: int = 0) -> CpuInfo:
    """CpuInfo from /proc/cpuinfo text (x86 ``flags`` or ARM ``Features``)."""
    model = ""
    flags: set[str] = set()
    seen_cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "processor":
            seen_cores += 1
    return CpuInfo(
        model=model or "unknown CPU",
        architecture=architecture or platform.machine(),
        cores=cores or seen_cores,
        flags=frozenset(flags),
    )


def probe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    import os

    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    info = parse_cpuinfo(text, platform.machine(), os.cpu_count() or 0)
    if info.model == "unknown CPU" and platform.processor():
        info = CpuInfo(platform.processor(), info.architecture, info.cores, info.flags)
    return info


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version
    --format=csv,noheader,nounits`` output; unreadable fields become unknown, not errors."""
    gpus: list[GpuInfo] = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        index, name, cc_text, memory, driver = parts
        gpus.append(
            GpuInfo(
                index=_int(index, len(gpus)),
                name=name,
                compute_capability=parse_cc(cc_text),
                memory_mib=_int(memory.split()[0] if memory else "", 0),
                driver=driver,
            )
        )
    return tuple(gpus)


def parse_cc(text: str) -> tuple[int, int] | None:
    """``"8.6"`` -> (8, 6); anything else (``[N/A]``) -> None."""
    major, sep, minor = text.strip().partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _gpus_from_nvml() -> tuple[GpuInfo, ...] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as err:  # pynvml.NVMLError_LibraryNotFound and friends
        logger.debug("NVML unavailable: %s", err)
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            gpus.append(GpuInfo(i, name, (int(major), int(minor)), int(memory), driver))
        return tuple(gpus)
    except Exception as err:  # any NVMLError: fall back to nvidia-smi
        logger.debug("NVML query failed: %s", err)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as err:  # shutdown failure changes nothing we report
            logger.debug("nvmlShutdown failed: %s", err)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


SmiRunner = Callable[[list[str]], str]


def _run_nvidia_smi(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)
    return done.stdout


def probe_gpus(
    smi: SmiRunner = _run_nvidia_smi,
    nvml: Callable[[], tuple[GpuInfo, ...] | None] = _gpus_from_nvml,
) -> tuple[tuple[GpuInfo, ...], str, tuple[str, ...]]:
    """(gpus, source, notes): NVML when importable, else nvidia-smi, else none."""
    gpus = nvml()
    if gpus is not None:
        return gpus, "nvml", ()
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return (), "none", ("no NVML (pynvml) and no nvidia-smi on PATH: no NVIDIA GPU visible",)
    argv = [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"]
    try:
        return parse_nvidia_smi(smi(argv)), "nvidia-smi", ()
    except (OSError, subprocess.SubprocessError) as err:
        return (), "none", (f"nvidia-smi failed ({err}); no NVIDIA GPU usable",)


def probe_tensorrt() -> tuple[str | None, str | None]:
    """(version, why-not) of the importable ``tensorrt`` package."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: the wheel is there but libnvinfer is not
        return None, f"tensorrt not importable ({err})"
    return str(getattr(tensorrt, "__version__", "unknown")), None


def probe_polygraphy() -> tuple[str | None, str | None]:
    """(version, why-not) of ``polygraphy`` (its TensorRT backend loads and runs Kiln's plans)."""
    try:
        import polygraphy
    except (ImportError, OSError) as err:
        return None, f"polygraphy not importable ({err})"
    return str(getattr(polygraphy, "__version__", "unknown")), None


def probe_onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime
    except ImportError:
        return None, ()
    return str(onnxruntime.__version__), tuple(onnxruntime.get_available_providers())


def probe_machine(smi: SmiRunner = _run_nvidia_smi, *, accelerators: bool = True) -> MachineInfo:
    """Probe this machine (bounded: nvidia-smi gets a few seconds at most).

    ``accelerators=False`` skips GPUs, TensorRT and Polygraphy (enough for a CPU build's decisions).
    """
    ort_version, providers = probe_onnxruntime()
    if not accelerators:
        return MachineInfo(cpu=probe_cpu(), onnxruntime_version=ort_version, ort_providers=providers)
    gpus, source, notes = probe_gpus(smi)
    trt_version, trt_note = probe_tensorrt()
    polygraphy_version, polygraphy_note = probe_polygraphy()
    extra = tuple(n for n in (trt_note, polygraphy_note) if n)
    return MachineInfo(
        cpu=probe_cpu(),
        onnxruntime_version=ort_version,
        ort_providers=providers,
        gpus=gpus,
        gpu_source=source,
        tensorrt_version=trt_version,
        polygraphy_version=polygraphy_version,
        notes=notes + extra,
    )


def trt_major(version: str | None) -> int | None:
    if not version:
        return None
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def missing_for_tensorrt(machine: MachineInfo) -> tuple[str, ...]:
    """What a TensorRT build or runner needs and this machine lacks."""
    missing = []
    if machine.tensorrt_version is None:
        missing.append("TensorRT (python package 'tensorrt')")
    if machine.polygraphy_version is None:
        missing.append("Polygraphy (python package 'polygraphy')")
    if not machine.gpus:
        missing.append("an NVIDIA GPU with a CUDA driver")
    return tuple(missing)
