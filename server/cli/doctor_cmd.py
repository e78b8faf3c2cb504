"""``kiln doctor [--json]``: what this machine can run, and what Kiln recommends."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.hardware import SLOW, SUPPORTED, Verdict, recommend, support_matrix
from runtime.machine import MachineInfo, probe_machine

STYLES = {SUPPORTED: "green", SLOW: "yellow"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="show this machine's CPU, GPUs, TensorRT and what each build needs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    machine = probe_machine()
    if args.json:
        print(json.dumps(doctor_report(machine), indent=2))
    else:
        print_report(machine, Console(highlight=False))
    return 0


def doctor_report(machine: MachineInfo) -> dict[str, Any]:
    """The JSON form: the probed machine, the support matrix and the recommendation."""
    matrix = support_matrix(machine)
    return {
        "machine": machine.to_dict(),
        "support": [
            {"target": target, "precision": precision, "status": v.status, "reason": v.reason}
            for (target, precision), v in matrix.items()
        ],
        "recommendation": recommend(machine),
    }


def print_report(machine: MachineInfo, console: Console) -> None:
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
    console.print(support_table(support_matrix(machine)))
    console.print(f"[bold]recommended:[/] kiln build {escape(recommend(machine))}")


def support_table(matrix: dict[tuple[str, str], Verdict]) -> Table:
    table = Table("target", "precision", "status", "why", title="What Kiln can build here")
    previous = ""
    for (target, precision), verdict in matrix.items():
        style = STYLES.get(verdict.status, "red")
        why = "(as above)" if verdict.reason == previous else escape(verdict.reason)
        table.add_row(target, precision, f"[{style}]{verdict.status}[/]", why)
        previous = verdict.reason
    return table
