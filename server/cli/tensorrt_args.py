"""The ``kiln build`` flags that only TensorRT builds read (kept out of build_cmd.py)."""

from __future__ import annotations

import argparse
from typing import Any

from builders.tensorrt_plan import HARDWARE_COMPAT, INT8_MODES


def add_tensorrt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT (--target tensorrt)")
    group.add_argument(
        "--shapes",
        action="append",
        default=[],
        metavar="NAME:MIN,OPT,MAX",
        help="optimization profile per input, e.g. input:1x1x8x8,8x1x8x8,32x1x8x8 (repeatable; "
        "default: batch 1, max-batch/2, max-batch)",
    )
    group.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace pool limit (default 1024)")
    group.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    group.add_argument(
        "--hardware-compat",
        default="none",
        choices=sorted(HARDWARE_COMPAT),
        help="plans that also run on other GPUs: ampere_plus, same_cc (default none: this GPU model only)",
    )
    group.add_argument(
        "--version-compat", action="store_true", help="plans that also run on later TensorRT versions"
    )
    group.add_argument(
        "--trt-int8",
        default="qdq",
        choices=INT8_MODES,
        help="INT8 as explicit Q/DQ (default; TensorRT 10 and 11) or TensorRT 10's calibrator reading Kiln's cache",
    )


def tensorrt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TensorRT entries of ``BuildRequest.options``."""
    return {
        "shapes": tuple(getattr(args, "shapes", ()) or ()),
        "workspace_mb": getattr(args, "workspace_mb", 1024),
        "opt_level": getattr(args, "opt_level", 3),
        "hardware_compat": getattr(args, "hardware_compat", "none"),
        "version_compat": bool(getattr(args, "version_compat", False)),
        "trt_int8": getattr(args, "trt_int8", "qdq"),
    }
