"""Graph conversions for the ONNX Runtime target: FP32 offline optimization and FP16.

FP32: ONNX Runtime's *basic* offline graph optimizations (constant folding, redundant node
elimination, semantics-preserving fusions into standard ONNX ops). Extended/all levels would
emit contrib or layout-specific ops, so the saved model would no longer be portable ONNX.

FP16: float16 weights and compute, FP32 inputs/outputs kept (Cast at the edges), and the
numerically sensitive ops (softmax, exponentials, reductions, normalizations) kept in FP32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnxruntime as ort

from core.errors import InvalidInputError

logger = logging.getLogger(__name__)

# Ops that lose too much in float16 (overflow in exp/pow/sums, cancellation in norms).
SENSITIVE_OPS: tuple[str, ...] = (
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "LayerNormalization",
    "InstanceNormalization",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "Range",
    "Resize",
    "Upsample",
)


def optimize_fp32(source: Path, dest: Path) -> Path:
    """Save the model after ONNX Runtime's basic (portable) offline graph optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dest)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise InvalidInputError(
            f"ONNX Runtime cannot load {str(source)!r}: {str(err).splitlines()[0]}; "
            "check the model with `kiln inspect` and its opset against onnxruntime's"
        ) from err
    _inline_external_data(source, dest)
    return dest


# protobuf cannot serialize a message of 2 GiB or more, so such models must keep external data
_PROTO_LIMIT = 2**31 - 1


def _inline_external_data(source: Path, dest: Path) -> None:
    """Make ``dest`` self-contained: ONNX Runtime's saved model still points at the source's data files."""
    from builders.inspection import external_data_files

    model = onnx.load(str(dest), load_external_data=False)
    if not external_data_files(model):
        return
    onnx.load_external_data_for_model(model, str(source.parent))
    if model.ByteSize() > _PROTO_LIMIT:
        raise InvalidInputError(
            f"{str(source)!r} holds over 2 GiB of weights; publishing models with external data files is not "
            "supported by this version of Kiln yet"
        )
    onnx.save(model, str(dest))


def convert_fp16(model: onnx.ModelProto, keep_fp32_nodes: Iterable[str] = ()) -> onnx.ModelProto:
    """Float16 conversion keeping FP32 I/O and sensitive ops (plus ``keep_fp32_nodes``) in FP32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(SENSITIVE_OPS))
    try:
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=blocked,
            node_block_list=list(keep_fp32_nodes),
        )
    except Exception as err:  # the converter raises bare ValueError/KeyError on odd graphs
        raise InvalidInputError(f"float16 conversion failed: {err}; try --precision fp32") from err
    return converted
