"""The ``kiln build`` flags that only TensorRT builds read (kept out of build_cmd.py)."""

from __future__ import annotations

import argparse

from builders.request import TensorRTOptions
from runtime.tensorrt.plan import HARDWARE_COMPAT, INT8_MODES

DEFAULTS = TensorRTOptions()


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
    group.add_argument(
        "--workspace-mb", type=int, default=DEFAULTS.workspace_mb,
        help=f"builder workspace pool limit (default {DEFAULTS.workspace_mb})",
    )  # fmt: skip
    group.add_argument(
        "--opt-level", type=int, default=DEFAULTS.opt_level,
        help=f"builder optimization level 0..5 (default {DEFAULTS.opt_level})",
    )  # fmt: skip
    group.add_argument(
        "--hardware-compat",
        default=DEFAULTS.hardware_compat,
        choices=sorted(HARDWARE_COMPAT),
        help="plans that also run on other GPUs: ampere_plus, same_cc (default none: this GPU model only)",
    )
    group.add_argument("--version-compat", action="store_true", help="plans that also run on later TensorRT versions")
    group.add_argument(
        "--trt-int8",
        default=DEFAULTS.int8_mode,
        choices=INT8_MODES,
        help="INT8 as explicit Q/DQ (default; TensorRT 10 and 11) or TensorRT 10's calibrator reading Kiln's cache",
    )


def tensorrt_options(args: argparse.Namespace) -> TensorRTOptions:
    """The request's TensorRT options from the parsed flags (checked as they are made)."""
    return TensorRTOptions(
        shapes=tuple(args.shapes or ()),
        workspace_mb=args.workspace_mb,
        opt_level=args.opt_level,
        hardware_compat=args.hardware_compat,
        version_compat=bool(args.version_compat),
        int8_mode=args.trt_int8,
    )
