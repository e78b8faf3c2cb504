"""``kiln inspect MODEL.onnx [--json]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.inspection import ModelInfo, describe_model, load_model


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="describe an ONNX model: I/O, opset, parameters, ops")
    parser.add_argument("model", type=Path, help="path of the .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    info = describe_model(model, args.model)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print_info(info, Console(highlight=False))
    return 0


def print_info(info: ModelInfo, console: Console) -> None:
    console.print(f"[bold]{escape(info.path)}[/]  sha256 {info.sha256[:16]}…")
    console.print(f"IR version {info.ir_version}, opset {info.opset}, producer {escape(info.producer or '?')}")
    table = Table("kind", "name", "dtype", "shape")
    for kind, specs in (("input", info.inputs), ("output", info.outputs)):
        for spec in specs:
            shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            table.add_row(kind, escape(spec.name), spec.dtype, escape(shape))
    console.print(table)
    console.print(
        f"parameters: {info.parameter_count:,} ({info.parameter_bytes / 1e6:.2f} MB); "
        f"weights in initializers: {info.weights_in_initializers}, in Constant nodes: {info.weights_in_constant_nodes}"
    )
    console.print(f"external data files: {escape(', '.join(info.external_data_files) or 'none')}")
    console.print(f"dynamic batch axis: {'yes' if info.batch_axis_dynamic else 'no'}")
    ops = Table("op", "count")
    for op, count in info.op_histogram.items():
        ops.add_row(escape(op), str(count))
    console.print(ops)
