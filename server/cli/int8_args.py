"""The ``kiln build`` flags that INT8 and automatic-precision builds read (kept out of build_cmd.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from builders.memory_budget import parse_memory
from builders.request import CALIB_METHODS, INT8_QUANT_MODES, Int8Options
from builders.validate import METRICS

DEFAULTS = Int8Options()


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("INT8 and --precision auto")
    group.add_argument(
        "--calib", type=Path, default=None,
        help="calibration data: .npz (arrays keyed by input name, batch first, optional 'labels'), "
        "a directory of .npz files, or an image folder",
    )  # fmt: skip
    group.add_argument(
        "--calib-method", default=DEFAULTS.calib_method, choices=CALIB_METHODS,
        help=f"threshold rule (default {DEFAULTS.calib_method}: entropy, percentile and minmax from one "
        "calibration pass, each validated, the best kept; TensorRT builds use entropy)",
    )  # fmt: skip
    group.add_argument(
        "--percentile", type=float, default=DEFAULTS.percentile,
        help=f"percentile for --calib-method percentile (default {DEFAULTS.percentile})",
    )  # fmt: skip
    group.add_argument(
        "--eval", type=Path, default=None,
        help="held-out evaluation data (default: a disjoint 30%% split of --calib)",
    )  # fmt: skip
    group.add_argument(
        "--max-accuracy-drop", type=float, default=DEFAULTS.max_drop,
        help=f"accuracy gate: largest allowed absolute drop of --metric (default {DEFAULTS.max_drop})",
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
    group.add_argument(
        "--calib-memory", default=f"{DEFAULTS.calib_memory >> 20}MiB",
        help="memory for one batch of activations in calibration and validation, e.g. 512MiB or 4GiB "
        f"(default {DEFAULTS.calib_memory >> 20}MiB); the batch size follows from it",
    )  # fmt: skip
    group.add_argument(
        "--int8-mode", default=DEFAULTS.mode, choices=INT8_QUANT_MODES,
        help="static (default): activation ranges calibrated from --calib; dynamic (--target ort only): "
        "int8 weights, activations quantized at run time, no calibration (transformer encoders); --eval gates it",
    )  # fmt: skip
    group.add_argument(
        "--allow-slower", action="store_true",
        help="quantize op patterns measured slower in INT8 on this CPU and publish an INT8 model slower than "
        "FP32 (by default such ops stay float, and a slower INT8 is refused)",
    )  # fmt: skip
    group.add_argument(
        "--keep-float", default="",
        help="comma-separated layers left in float: first, last (compute layers) and/or node names",
    )  # fmt: skip
    group.add_argument(
        "--equalize", action="store_true",
        help="cross-layer equalization before calibration: rescale conv -> (ReLU) -> conv channel pairs so "
        "per-channel weight ranges even out (FP32 outputs unchanged)",
    )  # fmt: skip
    group.add_argument(
        "--smoothquant", action="store_true",
        help="static INT8 for transformers (--precision int8 --target ort): SmoothQuant moves activation "
        "outliers into the weights (alpha searched per model), Q/DQ only on weight MatMul/Gemm inputs; "
        "LayerNorm, Softmax, GELU and attention-score MatMuls stay float",
    )  # fmt: skip
    # gate demos only:
    group.add_argument("--amax-scale", type=float, default=DEFAULTS.amax_scale, help=argparse.SUPPRESS)


def int8_options(args: argparse.Namespace) -> Int8Options:
    """The request's INT8 options from the parsed flags (checked as they are made)."""
    return Int8Options(
        calib=args.calib,
        calib_method=args.calib_method,
        percentile=args.percentile,
        eval=args.eval,
        max_drop=args.max_accuracy_drop,
        metric=args.metric,
        skip_gate=bool(args.skip_gate),
        preprocess=args.preprocess,
        cache_dir=args.calib_cache,
        amax_scale=args.amax_scale,
        calib_memory=parse_memory(args.calib_memory),
        mode=args.int8_mode,
        allow_slower=bool(args.allow_slower),
        equalize=bool(args.equalize),
        smoothquant=bool(args.smoothquant),
        keep_float=tuple(x.strip() for x in args.keep_float.split(",") if x.strip()),
    )
