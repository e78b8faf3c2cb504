"""The ``kiln build`` flags that INT8 and automatic-precision builds read (kept out of build_cmd.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from builders.thresholds import DEFAULT_PERCENTILE, METHODS
from builders.validate import DEFAULT_MAX_DROP, METRICS


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("INT8 and --precision auto")
    group.add_argument(
        "--calib", type=Path, default=None,
        help="calibration data: .npz (arrays keyed by input name, batch first, optional 'labels'), "
        "a directory of .npz files, or an image folder",
    )  # fmt: skip
    group.add_argument("--calib-method", default="entropy", choices=METHODS, help="threshold rule (default entropy)")
    group.add_argument(
        "--percentile", type=float, default=DEFAULT_PERCENTILE,
        help=f"percentile for --calib-method percentile (default {DEFAULT_PERCENTILE})",
    )  # fmt: skip
    group.add_argument(
        "--eval", type=Path, default=None,
        help="held-out evaluation data (default: a disjoint 30%% split of --calib)",
    )  # fmt: skip
    group.add_argument(
        "--max-accuracy-drop", type=float, default=DEFAULT_MAX_DROP,
        help=f"accuracy gate: largest allowed absolute drop of --metric (default {DEFAULT_MAX_DROP})",
    )  # fmt: skip
    group.add_argument(
        "--metric", default=None, choices=METRICS,
        help="gate metric (default: accuracy when the data has labels, else top1 agreement with FP32)",
    )  # fmt: skip
    group.add_argument(
        "--skip-gate", "--allow-accuracy-drop", dest="skip_gate", action="store_true",
        help="publish even when the gate fails (the failure is recorded in kiln.json)",
    )  # fmt: skip
    group.add_argument(
        "--preprocess", default=None,
        help='image folder preprocessing as JSON or a JSON file, e.g. {"size": [224, 224], "layout": "NCHW"}',
    )  # fmt: skip
    group.add_argument(
        "--calib-cache", type=Path, default=None,
        help="calibration cache directory (default .kiln-cache/calib beside --repo)",
    )  # fmt: skip
    group.add_argument("--amax-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # gate demos only


def int8_options(args: argparse.Namespace) -> dict[str, Any]:
    """The INT8 entries of ``BuildRequest.options`` (read by builders.int8_build.Int8Options)."""
    return {
        "calib": getattr(args, "calib", None),
        "calib_method": getattr(args, "calib_method", "entropy"),
        "percentile": getattr(args, "percentile", DEFAULT_PERCENTILE),
        "eval": getattr(args, "eval", None),
        "max_drop": getattr(args, "max_accuracy_drop", DEFAULT_MAX_DROP),
        "metric": getattr(args, "metric", None),
        "skip_gate": bool(getattr(args, "skip_gate", False)),
        "preprocess": getattr(args, "preprocess", None),
        "cache_dir": getattr(args, "calib_cache", None),
        "amax_scale": getattr(args, "amax_scale", 1.0),
    }
