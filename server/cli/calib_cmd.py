"""``kiln calib read CACHE [--json OUT]`` and ``kiln calib write CALIBRATION.json --out CACHE``.

Converts between Kiln's ``calibration.json`` and TensorRT's calibration cache (text format,
``TRT-<version>-<algorithm>`` header, one ``name: <hex float32 scale>`` line per tensor).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.calibration_file import CalibrationTable, read_trt_cache, to_trt_cache, write_trt_cache


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("calib", help="convert between calibration.json and a TensorRT calibration cache")
    calib = parser.add_subparsers(dest="calib_command", metavar="ACTION", required=True)
    read = calib.add_parser("read", help="read a TensorRT calibration cache (print it, or --json OUT)")
    read.add_argument("cache", type=Path, help="TensorRT calibration cache file")
    read.add_argument("--json", type=Path, default=None, metavar="OUT", help="write calibration.json here")
    read.set_defaults(func=run_read)
    write = calib.add_parser("write", help="write a TensorRT calibration cache from calibration.json")
    write.add_argument("calibration", type=Path, help="Kiln calibration.json")
    write.add_argument("--out", type=Path, required=True, help="TensorRT cache file to write")
    write.add_argument("--trt-version", default=None, help="TensorRT version for the header, e.g. 10.3.0")
    write.set_defaults(func=run_write)


def run_read(args: argparse.Namespace) -> int:
    table = read_trt_cache(args.cache)
    if args.json is not None:
        table.write_json(args.json)
        Console(highlight=False).print(f"wrote {len(table.amax)} tensors to {escape(str(args.json))}")
        return 0
    print_table(table, Console(highlight=False))
    return 0


def run_write(args: argparse.Namespace) -> int:
    table = CalibrationTable.read_json(args.calibration)
    write_trt_cache(args.out, to_trt_cache(table, args.trt_version))
    Console(highlight=False).print(f"wrote {len(table.amax)} tensors to {escape(str(args.out))}")
    return 0


def print_table(table: CalibrationTable, console: Console) -> None:
    console.print(
        escape(
            f"method {table.method}, TensorRT {table.trt_version or '?'} {table.trt_algorithm}, "
            f"{len(table.amax)} tensors"
        )
    )
    rows = Table("tensor", "amax", "scale (amax/127)")
    for name, amax in table.amax.items():
        rows.add_row(escape(name), f"{amax:.6g}", f"{table.scale(name):.6g}")
    console.print(rows)
    if table.skipped:
        console.print(escape(json.dumps(dict(table.skipped), indent=2)))
