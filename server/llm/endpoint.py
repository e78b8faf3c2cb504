"""A decoder served as a Triton decoupled model: its limits from config.pbtxt, its request inputs.

Config (``kiln build`` writes it): ``model_transaction_policy { decoupled: true }`` and parameters
``tokenizer`` (``byte`` or a file in the version directory), ``max_context`` (tokens; defaults to
the ONNX metadata ``max_position_embeddings``), ``max_tokens`` (the most a request may ask for),
``default_max_tokens`` and ``stop_token_ids`` (comma-separated).

Request inputs: ``text_input`` (BYTES, one element) or ``input_ids`` (INT32/INT64), and optionally
``max_tokens``, ``stream`` (BOOL, default true: one response per token), ``temperature``, ``top_k``
and ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from builders.decoder_build import REQUEST_INPUTS
from core.errors import InvalidInputError, RepositoryError
from runtime.decoder import DecoderLayout, Generation, RunFn, Sampling, read_layout
from runtime.tokenizer import BYTE_TOKENIZER, Tokenizer, load_tokenizer

DEFAULT_MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = 64


@dataclass(frozen=True)
class DecoderLimits:
    """The serving limits of one decoder, from its config parameters."""

    tokenizer: str
    max_context: int
    max_tokens: int
    default_max_tokens: int
    stop_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    stream: bool
    sampling: Sampling


def is_decoupled(config: mc.ModelConfig) -> bool:
    return bool(config.model_transaction_policy.decoupled)


def read_limits(name: str, config: mc.ModelConfig, layout: DecoderLayout) -> DecoderLimits:
    """Parse the decoder parameters of ``config``; a bad value names the parameter and the fix."""
    params = {k: v.string_value for k, v in config.parameters.items()}

    def integer(key: str, default: int | None) -> int:
        text = params.get(key, "")
        if not text:
            if default is None:
                raise RepositoryError(
                    f"model {name!r}: config parameter {key!r} is missing and the ONNX metadata does not say it; "
                    "republish with 'kiln build --max-context N'"
                )
            return default
        if not text.strip().isdigit() or int(text) < 1:
            raise RepositoryError(f"model {name!r}: config parameter {key!r} must be a positive integer, got {text!r}")
        return int(text)

    context = integer("max_context", layout.max_context)
    limit = integer("max_tokens", DEFAULT_MAX_TOKENS_LIMIT)
    default = min(integer("default_max_tokens", DEFAULT_MAX_TOKENS), limit)
    stops = params.get("stop_token_ids", "").replace(" ", "")
    try:
        stop_ids = tuple(int(t) for t in stops.split(",") if t)
    except ValueError as err:
        raise RepositoryError(
            f"model {name!r}: config parameter 'stop_token_ids' must be comma-separated integers, got {stops!r}"
        ) from err
    return DecoderLimits(params.get("tokenizer", BYTE_TOKENIZER), context, limit, default, stop_ids)


class DecoderEndpoint:
    """One decoder version: layout, tokenizer and limits; starts and tracks its generations."""

    def __init__(self, name: str, layout: DecoderLayout, limits: DecoderLimits, tokenizer: Tokenizer) -> None:
        self.name, self.layout, self.limits, self.tokenizer = name, layout, limits, tokenizer
        self.live: set[Generation] = set()  # generations holding a KV cache right now
        self.steps_run = 0

    def parse(self, inputs: dict[str, np.ndarray]) -> GenerationRequest:
        """Check a request's inputs; every problem is refused before any token is generated."""
        known = {s.name for s in REQUEST_INPUTS}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise InvalidInputError(f"model {self.name!r} has no inputs {unknown}; it takes {sorted(known)}")
        if ("text_input" in inputs) == ("input_ids" in inputs):
            raise InvalidInputError(f"model {self.name!r} needs exactly one of 'text_input' or 'input_ids'")
        if "text_input" in inputs:
            prompt = self.tokenizer.encode(_text(inputs["text_input"]))
        else:
            ids = inputs["input_ids"]
            if ids.dtype.kind not in "iu":
                raise InvalidInputError(f"input 'input_ids' must be INT32 or INT64, got {ids.dtype}")
            prompt = [int(t) for t in ids.reshape(-1)]
        max_tokens = _int(inputs, "max_tokens", self.limits.default_max_tokens)
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidInputError(
                f"max_tokens is {max_tokens}; model {self.name!r} generates 1..{self.limits.max_tokens} tokens per "
                "request (config parameter 'max_tokens')"
            )
        if len(prompt) >= self.limits.max_context:
            raise InvalidInputError(
                f"the prompt is {len(prompt)} tokens; model {self.name!r} has a context of "
                f"{self.limits.max_context} tokens; shorten the prompt below that"
            )
        sampling = Sampling(
            temperature=_float(inputs, "temperature", 0.0),
            top_k=_int(inputs, "top_k", 0),
            seed=_int(inputs, "seed", 0),
        )
        return GenerationRequest(tuple(prompt), max_tokens, _bool(inputs, "stream", True), sampling)

    def start(self, request: GenerationRequest, run: RunFn) -> Generation:
        """A new generation, counted in ``live`` until ``finish`` is called."""
        generation = Generation(
            self._counted(run),
            self.layout,
            request.prompt,
            max_new_tokens=request.max_tokens,
            max_context=self.limits.max_context,
            sampling=request.sampling,
            stop_ids=self.limits.stop_ids,
        )
        self.live.add(generation)
        return generation

    def finish(self, generation: Generation) -> None:
        generation.close()
        self.live.discard(generation)

    def _counted(self, run: RunFn) -> RunFn:
        def counted(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.steps_run += 1
            return run(inputs)

        return counted


def load_endpoint(name: str, config: mc.ModelConfig, artifact: Path) -> DecoderEndpoint:
    """The endpoint of one published decoder version (its ONNX file and tokenizer beside it)."""
    layout = read_layout(artifact, model=name)
    limits = read_limits(name, config, layout)
    return DecoderEndpoint(name, layout, limits, load_tokenizer(limits.tokenizer, artifact.parent))


def _text(arr: np.ndarray) -> str:
    if arr.size != 1:
        raise InvalidInputError(f"input 'text_input' must hold one prompt, got {arr.size} elements")
    value = arr.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"input 'text_input' is not valid UTF-8 ({err})") from err


def _one(inputs: dict[str, np.ndarray], name: str, kinds: str) -> object | None:
    """The single value of an optional input (None when absent), of a dtype kind in ``kinds``."""
    if name not in inputs:
        return None
    arr = inputs[name]
    if arr.size != 1:
        raise InvalidInputError(f"input {name!r} must hold one value, got shape {list(arr.shape)}")
    if arr.dtype.kind not in kinds:
        raise InvalidInputError(
            f"input {name!r} has datatype {arr.dtype}; it takes kinds {kinds!r} (i: int, f: float, b: bool)"
        )
    return arr.reshape(-1)[0].item()


def _int(inputs: dict[str, np.ndarray], name: str, default: int) -> int:
    value = _one(inputs, name, "iu")
    return default if value is None else int(value)  # type: ignore[call-overload]


def _float(inputs: dict[str, np.ndarray], name: str, default: float) -> float:
    value = _one(inputs, name, "fiu")
    return default if value is None else float(value)  # type: ignore[arg-type]


def _bool(inputs: dict[str, np.ndarray], name: str, default: bool) -> bool:
    value = _one(inputs, name, "b")
    return default if value is None else bool(value)
