"""``kiln doctor [--json]``: what this machine can run, and what Kiln recommends."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.hardware import SLOW, SUPPORTED, Verdict, recommend, support_matrix
from builders.op_speed import load_or_measure
from builders.quantize import choose_ort_format
from builders.request import DEFAULT_REPO
from runtime.machine import MachineInfo, probe_machine

STYLES = {SUPPORTED: "green", SLOW: "yellow"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="show this machine's CPU, GPUs, TensorRT and what each build needs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--repo", type=Path, default=DEFAULT_REPO,
        help="repository whose .kiln-cache holds the INT8 op timings (measured once per CPU ISA, a few seconds)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    machine = probe_machine()
    op_speed = measured_op_speed(machine, args.repo)
    if args.json:
        print(json.dumps(doctor_report(machine, op_speed), indent=2))
    else:
        print_report(machine, Console(highlight=False), op_speed)
    return 0


def measured_op_speed(machine: MachineInfo, repo: Path) -> dict[str, float] | None:
    """INT8/FP32 latency per op pattern on this CPU (cached where kiln build caches it), or None
    when ONNX Runtime is missing."""
    if machine.onnxruntime_version is None:
        return None
    fmt = choose_ort_format(machine.cpu.flags)
    return load_or_measure(repo.resolve().parent / ".kiln-cache" / "op-speed", machine.cpu.flags, fmt.name)


def doctor_report(machine: MachineInfo, op_speed: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON form: the probed machine, the support matrix and the recommendation."""
    matrix = support_matrix(machine, op_speed)
    return {
        "int8_op_speed": op_speed,
        "machine": machine.to_dict(),
        "support": [
            {"target": target, "precision": precision, "status": v.status, "reason": v.reason}
            for (target, precision), v in matrix.items()
        ],
        "recommendation": recommend(machine, op_speed),
    }


def print_report(machine: MachineInfo, console: Console, op_speed: dict[str, float] | None = None) -> None:
    cpu = machine.cpu
    console.print(f"[bold]CPU[/] {escape(cpu.model)} ({cpu.architecture}, {cpu.cores} cores)")
    console.print(f"  ISA: {', '.join(cpu.isa()) or 'no AVX2'}")
    providers = ", ".join(machine.ort_providers) or "none"
    console.print(f"[bold]ONNX Runtime[/] {machine.onnxruntime_version or 'not installed'} (providers: {providers})")
    if machine.gpus:
        title = f"NVIDIA GPUs ({machine.gpu_source})"
        gpus = Table("GPU", "name", "compute capability", "memory", "driver", title=title)
        for gpu in machine.gpus:
            gpus.add_row(str(gpu.index), escape(gpu.name), gpu.cc, f"{gpu.memory_mib:,} MiB", gpu.driver)
        console.print(gpus)
    else:
        console.print("[bold]NVIDIA GPUs[/] none found")
    console.print(f"[bold]TensorRT[/] {machine.tensorrt_version or 'not importable'}")
    console.print(f"[bold]Polygraphy[/] {machine.polygraphy_version or 'not importable'}")
    for note in machine.notes:
        console.print(f"  [dim]{escape(note)}[/]")
    console.print(support_table(support_matrix(machine, op_speed)))
    console.print(f"[bold]recommended:[/] kiln build {escape(recommend(machine, op_speed))}")


def support_table(matrix: dict[tuple[str, str], Verdict]) -> Table:
    table = Table("target", "precision", "status", "why", title="What Kiln can build here")
    previous = ""
    for (target, precision), verdict in matrix.items():
        style = STYLES.get(verdict.status, "red")
        why = "(as above)" if verdict.reason == previous else escape(verdict.reason)
        table.add_row(target, precision, f"[{style}]{verdict.status}[/]", why)
        previous = verdict.reason
    return table
