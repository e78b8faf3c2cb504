"""Build a decoder with KV cache (optimum's layout) into a decoupled, token-streaming model.

``kiln build --decoder`` (or any model with ``past_key_values.*`` inputs) comes here: FP32 (basic
graph optimizations), FP16 (FP32 I/O kept) or dynamic INT8 (weights int8 per channel, activations
quantized at run time by ONNX Runtime's ``quantize_dynamic``: no calibration data). The build
checks the KV layout (naming the inputs it expected when they are missing), replays a few prompts
greedily on the source and the candidate and records token agreement, and publishes a config with
``model_transaction_policy { decoupled: true }`` plus the decoder parameters ``kiln serve`` reads.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx
from tritonclient.grpc import model_config_pb2 as mc

from builders.convert import convert_fp16, optimize_fp32
from builders.inspection import ModelInfo
from builders.manifest import build_manifest
from builders.model_config import ServingOptions, render_config
from builders.publish import publish_version
from builders.repository import Published
from builders.request import DecoderOptions
from builders.tensors import TensorSpec
from core.errors import InvalidInputError
from runtime.decoder import DecoderLayout, Sampling, generate, layout_of, read_layout
from runtime.onnxruntime import OrtRunner
from runtime.tokenizer import BYTE_TOKENIZER, load_tokenizer

logger = logging.getLogger(__name__)

DECODER_PRECISIONS = ("fp32", "fp16", "int8")
REQUEST_INPUTS = (
    TensorSpec("text_input", "object", (1,)),
    TensorSpec("input_ids", "int64", (-1,)),
    TensorSpec("max_tokens", "int32", (1,)),
    TensorSpec("stream", "bool", (1,)),
    TensorSpec("temperature", "float32", (1,)),
    TensorSpec("top_k", "int32", (1,)),
    TensorSpec("seed", "int64", (1,)),
)
RESPONSE_OUTPUTS = (TensorSpec("text_output", "object", (1,)), TensorSpec("output_ids", "int64", (-1,)))
CHECK_PROMPTS = ("The quick brown fox", "Once upon a time", "def main():", "1, 2, 3,")


def is_decoder(model: onnx.ModelProto) -> bool:
    """Whether a model has KV-cache inputs (so ``kiln build`` treats it as a decoder without --decoder)."""
    return any(v.name.startswith("past_key_values.") for v in model.graph.input)


def decoder_config(
    name: str, instances: int, layout: DecoderLayout, options: DecoderOptions, context: int
) -> mc.ModelConfig:
    """The decoupled config: request inputs (all optional), token outputs, decoder parameters."""
    config = render_config(
        name, "ort", REQUEST_INPUTS, RESPONSE_OUTPUTS, ServingOptions(max_batch_size=0, instances=instances)
    )
    for tensor in config.input:
        tensor.optional = True
    config.model_transaction_policy.decoupled = True
    params = {
        "tokenizer": "tokenizer.json" if options.tokenizer is not None else BYTE_TOKENIZER,
        "max_context": str(context),
        "max_tokens": str(min(options.max_new_tokens, context - 1)),
        "stop_token_ids": ",".join(str(t) for t in options.stop_token_ids),
        "kv_layers": str(layout.layers),
    }
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def build_decoder_engine(source: Path, precision: str, dest: Path, tmp: Path) -> Path:
    """The artifact for one precision, written to ``dest``."""
    if precision not in DECODER_PRECISIONS:
        raise InvalidInputError(
            f"a decoder builds at precision {list(DECODER_PRECISIONS)} (int8: dynamic, weight int8); got {precision!r}"
        )
    if precision == "fp32":
        return optimize_fp32(source, dest)
    fp32 = optimize_fp32(source, tmp / "fp32.onnx")
    if precision == "fp16":
        onnx.save(convert_fp16(onnx.load(str(fp32))), str(dest))
        return dest
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(fp32, dest, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    except Exception as err:  # onnxruntime.quantization raises bare exceptions on unsupported graphs
        raise InvalidInputError(f"dynamic INT8 quantization of {str(source)!r} failed: {err}; try fp16") from err
    return dest


def token_agreement(
    reference: Path, candidate: Path, prompts: list[list[int]], *, tokens: int, context: int, stop_ids: tuple[int, ...]
) -> dict[str, Any]:
    """Greedy replays on both models: exact-match rate and first divergence position per prompt."""
    ref_runner = OrtRunner(reference, intra_op_threads=0, model="reference")  # accuracy only: every core
    cand_runner = OrtRunner(candidate, intra_op_threads=0, model="candidate")
    layout_ref, layout_cand = read_layout(reference), read_layout(candidate)
    divergences: list[int | None] = []
    try:
        for prompt in prompts:
            kwargs: dict[str, Any] = {"max_new_tokens": tokens, "max_context": context, "stop_ids": stop_ids}
            a = generate(ref_runner.run, layout_ref, prompt, sampling=Sampling(), **kwargs)
            b = generate(cand_runner.run, layout_cand, prompt, sampling=Sampling(), **kwargs)
            divergences.append(first_divergence(a, b))
    finally:
        ref_runner.close()
        cand_runner.close()
    exact = sum(d is None for d in divergences)
    return {
        "metric": "greedy_exact_match",
        "prompts": len(prompts),
        "tokens_per_prompt": tokens,
        "exact_match_rate": exact / len(prompts) if prompts else 1.0,
        "first_divergence": divergences,
    }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def build_decoder(
    source: Path,
    info: ModelInfo,
    *,
    name: str,
    precision: str,
    repo: Path,
    instances: int,
    options: DecoderOptions,
) -> tuple[Published, dict[str, Any]]:
    """Check, convert, compare and publish one decoder; returns the published version and its check."""
    layout = layout_of(onnx.load(str(source), load_external_data=False), model=name)
    context = options.max_context or layout.max_context
    if context is None:
        raise InvalidInputError(
            f"decoder {str(source)!r} does not say its context length (no 'max_position_embeddings' metadata); "
            "give --max-context N"
        )
    tokenizer = load_tokenizer(
        options.tokenizer.name if options.tokenizer else BYTE_TOKENIZER,
        options.tokenizer.parent if options.tokenizer else source.parent,
    )
    prompts = [tokenizer.encode(p)[: context - options.check_tokens - 1] or [0] for p in CHECK_PROMPTS]
    with tempfile.TemporaryDirectory(prefix="kiln-decoder-") as tmp:
        artifact = build_decoder_engine(source, precision, Path(tmp) / "model.onnx", Path(tmp))
        layout_of(onnx.load(str(artifact), load_external_data=False), model=name)  # the conversion kept the layout
        check = token_agreement(
            source,
            artifact,
            prompts,
            tokens=min(options.check_tokens, context - max(len(p) for p in prompts)),
            context=context,
            stop_ids=options.stop_token_ids,
        )
        config = decoder_config(name, instances, layout, options, context)
        manifest = build_manifest(
            model_name=name,
            source_path=source,
            source_sha256=info.sha256,
            precision=precision,
            target="ort",
            artifact=artifact.name,
            files={},
            build={"decoder": True, "kv_layers": layout.layers, "max_context": context, "instances": instances},
            validation=check,
        )
        files = {artifact.name: artifact}
        if options.tokenizer is not None:
            files["tokenizer.json"] = options.tokenizer
        published = publish_version(repo, name, files, config, manifest)
    logger.info("decoder %s: greedy exact match %.2f on %d prompts", name, check["exact_match_rate"], len(prompts))
    return published, check
